"""The Mac acceptance kit: what the first person with a Mac runs (``make mac-acceptance``, or
``mlxsupctl doctor --deep``), printing a table to paste into a bug report, plus the same as JSON.

Rows: a real MLX allocation shows in the footprint within 10% (Metal and ``phys_footprint`` on macOS); a job
leaking 50 MiB per step is supervised by ``mlxsupd`` to its target with no sample over the kill ceiling; SIGKILL of
the worker mid-checkpoint loses nothing; F_FULLFSYNC (else fsync) works on the checkpoint volume; a throwaway
LaunchAgent runs a job with ProcessType as set; the pressure level reads; the run dir is under $TMPDIR; and the
default ``daemon.growth_rate`` against the fastest growth sampled in the run. Elsewhere than macOS the rows that
apply run (on the CPU) and the others say "not on this platform". Exit status 0 when no row FAILs.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from supervisor.tools.acceptance_checks import (
    FAIL,
    Row,
    check_allocation,
    check_durable_write,
    check_growth,
    check_launch_agent,
    check_leaking_job,
    check_pressure,
    check_run_dir,
    check_sigkill_mid_checkpoint,
)

DEFAULT_MIB = 512


def run_kit(workdir: Path, mib: int = DEFAULT_MIB) -> list[Row]:
    """Every check in order; an unexpected error in one is that row's FAIL, never the end of the kit."""
    run_dir = Path(tempfile.mkdtemp(prefix="mlxsup-k-"))  # $TMPDIR on macOS; short enough for sockets
    leak_dir: list[Path | None] = [None]

    def leak() -> Row:
        row, leak_dir[0] = check_leaking_job(workdir, run_dir)
        return row

    steps: list[tuple[str, Callable[[], Row]]] = [
        ("allocation in the footprint", lambda: check_allocation(mib)),
        ("leaking job supervised", leak),
        ("SIGKILL mid-checkpoint", lambda: check_sigkill_mid_checkpoint(workdir, run_dir)),
        ("durable write on the checkpoint volume", lambda: check_durable_write(workdir / "state" / "jobs")),
        ("LaunchAgent runs a job", lambda: check_launch_agent(workdir, run_dir)),
        ("memory pressure level", check_pressure),
        ("run dir under $TMPDIR", check_run_dir),
        ("growth_rate vs fastest growth seen", lambda: check_growth(leak_dir[0])),
    ]
    rows = []
    try:
        for name, step in steps:
            started = time.monotonic()
            try:
                row = step()
            except Exception as exc:  # a kit reports every failure and goes on
                row = Row(name, FAIL, "-", f"{type(exc).__name__}: {exc}")
            row.data["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def machine() -> dict[str, Any]:
    """What the report is about: platform, OS release, CPU, Python, MLX."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx = version("mlx")
    except PackageNotFoundError:
        mlx = "not installed"
    mac = platform.mac_ver()[0]
    return {"platform": sys.platform, "os": f"macOS {mac}" if mac else platform.platform(),
            "machine": platform.machine(), "python": platform.python_version(), "mlx": mlx}


def table(rows: list[Row], about: dict[str, Any]) -> str:
    """The rows as a Markdown table, headed by the machine, ready to paste into a bug report."""
    lines = [f"mlx-supervisor acceptance kit: {about['os']} {about['machine']}, Python {about['python']}, "
             f"MLX {about['mlx']}", "", "| check | result | measured | detail |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.status} | {r.measured} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def report(rows: list[Row], about: dict[str, Any]) -> dict[str, Any]:
    return {**about, "passed": not any(r.status == FAIL for r in rows), "rows": [asdict(r) for r in rows]}


def run_and_report(as_json: bool, out: Path | None, mib: int = DEFAULT_MIB, keep: bool = False) -> int:
    """Run the kit, print the table (or the JSON), write the JSON to ``out``; 0 when no row failed."""
    workdir = Path(tempfile.mkdtemp(prefix="mlxsup-kit-"))
    try:
        rows = run_kit(workdir, mib)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    about = machine()
    document = report(rows, about)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps(document, indent=2) if as_json else table(rows, about))
    if out is not None and not as_json:
        print(f"\nJSON: {out}" + (f"  (work dir kept: {workdir})" if keep else ""))
    return 0 if document["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m supervisor.tools.acceptance", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--mib", type=int, default=DEFAULT_MIB, help="MiB to allocate for the footprint check "
                        "(default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (configs, telemetry, checkpoints)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mib < 16:
        print(f"acceptance: --mib {args.mib}: at least 16 MiB, or the 10% tolerance is noise", file=sys.stderr)
        return 2
    return run_and_report(args.json, args.out, args.mib, args.keep)


if __name__ == "__main__":
    sys.exit(main())
