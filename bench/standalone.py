"""``python -m bench.standalone --progress FILE WORKER_ARGS...``: the built-in job run standalone (no daemon),
exactly as ``python -m worker`` runs it, plus one line ``step seconds`` per optimizer step appended to FILE.

The unsupervised goodput arm needs to know how far a run got and how long each step took even when it is
SIGKILLed, which ``--stats-file`` (written at a clean exit) cannot tell. One unbuffered ``write`` per step.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from worker.cli import build_parser, check_args


def _progress_session(fd: int) -> Any:
    """A Session subclass that logs each step's duration to ``fd`` before the usual end-of-step work."""
    from worker.session import Session

    class ProgressSession(Session):
        def end_step(self, step: int, loss: float, extra: dict[str, Any] | None = None, **fields: Any) -> None:
            seconds = time.perf_counter() - self._last_end
            os.write(fd, f"{step} {seconds:.6f} {time.time():.6f}\n".encode())
            super().end_step(step, loss, extra, **fields)

    return ProgressSession


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--progress":
        print("usage: python -m bench.standalone --progress FILE [worker options]", file=sys.stderr)
        return 2
    progress, rest = argv[1], argv[2:]
    parser = build_parser()
    args = parser.parse_args(rest)
    check_args(args, parser)
    from worker.train import train

    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        session = _progress_session(fd).from_env(target_steps=args.steps, batch=args.batch, accum=args.accum)
        try:
            train(session, args, fault_due=lambda after, done: False)
        finally:
            session.close()
    finally:
        os.close(fd)
    return 0


def read_progress(path: str | os.PathLike[str]) -> list[tuple[int, float, float]]:
    """(step, step seconds, wall time) per complete line of a progress file; a torn last line is skipped."""
    rows: list[tuple[int, float, float]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        try:
            rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return rows


if __name__ == "__main__":
    sys.exit(main())
