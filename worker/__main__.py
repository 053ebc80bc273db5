"""``python -m worker``: the built-in MLX training job, supervised through the Session SDK.

Run it by hand to train standalone (``--checkpoint-dir`` to checkpoint), or let ``mlxsupd`` spawn it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from worker.cli import build_parser, check_args


def _fault_due(args: argparse.Namespace, after: int, done_in_life: int) -> bool:
    if after < 0 or done_in_life < after:
        return False
    if not args.fault_once_file:
        return True
    marker = Path(args.fault_once_file)
    if marker.exists():
        return False
    marker.touch()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    if args.checkpoint_dir and not os.environ.get("MLXSUP_CHECKPOINT_DIR"):
        os.environ["MLXSUP_CHECKPOINT_DIR"] = args.checkpoint_dir
    # Imported here so that --help and argument errors do not pay for importing MLX.
    from worker.session import Session
    from worker.train import train

    session = Session.from_env(target_steps=args.steps, batch=args.batch, accum=args.accum)

    try:
        train(session, args, fault_due=lambda after, done: _fault_due(args, after, done))
    except FileNotFoundError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
