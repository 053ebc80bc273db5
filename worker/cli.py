"""Options of the built-in job, importable without MLX (the daemon validates configs with them)."""

from __future__ import annotations

import argparse
from typing import Any


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Train the built-in byte-level transformer LM under (or without) mlxsupd.",
    )
    arg = parser.add_argument
    arg("--steps", type=int, default=1000, help="optimizer steps to reach (default: %(default)s)")
    arg("--batch", type=int, default=8, help="micro-batch size; the daemon may override it (default: %(default)s)")
    arg("--accum", type=int, default=1, help="gradient accumulation micro-batches per step (default: %(default)s)")
    arg("--seed", type=int, default=0, help="seed for weights and data order (default: %(default)s)")
    arg("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    arg("--dim", type=int, default=64, help="model width (default: %(default)s)")
    arg("--layers", type=int, default=2, help="transformer blocks (default: %(default)s)")
    arg("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    arg("--context", type=int, default=64, help="bytes per sample (default: %(default)s)")
    arg("--data", default="", help="text file or directory to train on (default: the stdlib's .py sources)")
    arg("--checkpoint-dir", default="", help="where to checkpoint when run standalone")
    arg("--leak-mb-per-step", type=float, default=0.0, help="inject a leak of this many MiB per step")
    arg("--peak-mb-per-sample", type=float, default=0.0, help="inject a transient peak of MiB x batch per step")
    arg("--peak-until-step", type=int, default=0, help="stop the peak after this step (0: never)")
    arg("--crash-after-steps", type=int, default=-1, help="test fault: exit 3 after this many steps in one life")
    arg("--hang-after-steps", type=int, default=-1, help="test fault: stop responding after this many steps")
    arg("--step-sleep", type=float, default=0.0, help="test fault: every step also sleeps this long (a slow step)")
    arg("--stats-file", default="", help="write {steps, seconds, steps_per_second} of this life as JSON at exit")
    arg("--fault-rank", type=int, default=-1, help="in a gang, inject the test faults on this rank only (-1: all)")
    arg("--fault-once-file", default="", help="fire each test fault only while this file does not exist")
    return parser


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject values argparse's types let through."""
    for name in ("steps", "batch", "accum", "dim", "layers", "heads", "context"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.dim % args.heads:
        parser.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")



def train_argv(options: dict[str, Any]) -> list[str]:
    """Turn a config's ``train`` table into worker arguments; ValueError names a bad option."""
    parser = build_parser()
    known = {a.dest: a for a in parser._actions if a.dest != "help"}
    argv: list[str] = []
    for key, value in options.items():
        action = known.get(key.replace("-", "_"))
        if action is None:
            raise ValueError(f"unknown option {key!r}; known: {', '.join(sorted(known))}")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{key} = {value!r}: expected a number or a string")
        argv += [action.option_strings[0], str(value)]
    strict = _RaisingParser(prog=parser.prog, add_help=False)
    for action in parser._actions:
        if action.dest != "help":
            strict._add_action(action)
    check_args(strict.parse_args(argv), strict)
    return argv
