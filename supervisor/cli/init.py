"""``mlxsupctl init [--budget B] [-o FILE] [-- CMD ...]``: write a commented starter config.

The job is the one ``mlxsupd run -- CMD`` would run (the same classification: SDK script, guard-only program or
mlx-lm fine-tune); without a command it is the built-in LM. The file goes to the platform's config path unless
``-o`` names another; an existing file is never overwritten. The result loads with ``load_config``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from supervisor import paths
from supervisor.config import ConfigError, load_config, toml_value
from supervisor.core.sizes import format_bytes

HEADER = """\
# mlx-supervisor config, written by `mlxsupctl init`. Every key and its default: docs/config.md, "Configuration
# reference" (or `python -m supervisor.tools.docs`).
#   mlxsupd -c {path}
#       the daemon, in the foreground (`mlxsupctl service install -c {path}` makes it a service)
#   mlxsupd run -c {path} {name}
#       this job alone, in the foreground, until it ends
#   mlxsupctl -c {path} status
#       in another shell

[daemon]
# run_dir = ""             # private dir of the ipc sockets; default: the platform's (mlxsupctl finds it)
# state_dir = ""           # history, telemetry, checkpoints, logs; default: the platform's state dir
# system_floor = "0"       # available memory under which jobs checkpoint and wait, e.g. "4GiB" or "10%"
"""

LIMITS = """\
budget = {budget}{budget_note}
# warn = "85%"             # of the budget: ask the worker to clear MLX's cache
# kill = "110%"            # of the budget: SIGTERM the worker's group at once (SIGKILL after kill_grace)
# max_attempts_without_progress = 5   # starts in a row without progress, then FATAL
"""

SDK_KEYS = """\
# batch = 8                # configured micro-batch: shrinks on a peak, regrows up to this
# accum = 1                # gradient accumulation; batch x accum is kept on a shrink
# checkpoint_every = 100   # steps between periodic checkpoints
"""

GUARD_KEYS = """\
sdk = false                # guard-only: no hello, no checkpoints; SIGTERM at the budget, started over after it
# restart = "on-breach"    # or "never": leave it stopped after a budget kill
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser(
        "init", help="write a commented starter config (-- CMD: with a job for that command)",
        usage="mlxsupctl init [--budget B] [-o FILE] [--name NAME] [--sdk auto|yes|no] [-- CMD [ARGS...]]",
        description="Write a starter config to the platform's config path (or -o FILE), with a job for the "
        "command after '--' (as `mlxsupd run -- CMD` would run it) or for the built-in LM. Never overwrites.")
    init.add_argument("-o", "--output", type=Path, default=None,
                      help=f"where to write it (default {paths.default_config_path()})")
    init.add_argument("--budget", default=None, help="the job's budget (default: mlxsupd run's)")
    init.add_argument("--name", default=None, help="the job's name (default: from the command)")
    init.add_argument("--sdk", choices=["auto", "yes", "no"], default="auto", help="as mlxsupd run --sdk")


def job_text(name: str, argv: list[str], budget: str | None, sdk: str, cwd: Path, total: int) -> str:
    """The [jobs.NAME] tables of a starter config for ``argv`` (empty: the built-in LM)."""
    from supervisor.cli.oneline import _mlx_lm_table, classify, default_budget

    if budget is None:
        shown, note = f"total - {_size(total - default_budget(total))}", (
            "   # hard budget: bytes (\"12GiB\"), percent of total (\"75%\") or \"total - 8GiB\"")
    else:
        shown, note = budget, ""
    lines = [f"[jobs.{name}]"]
    limits = LIMITS.format(budget=toml_value(shown), budget_note=note)
    if not argv:
        return "\n".join(lines) + "\n" + limits + SDK_KEYS + f"[jobs.{name}.train]  # the built-in LM\nsteps = 1000\n"
    command = classify(argv, cwd)
    if command.mlx_lm is not None:
        table = _mlx_lm_table(command.mlx_lm, cwd)
        body = "\n".join(f"{key} = {toml_value(value)}" for key, value in table.items())
        return (f"{lines[0]}\n{limits}\n[jobs.{name}.mlx_lm]  # mlx_lm.lora's options; batch and accum come from "
                f"batch_size and grad_accumulation_steps\n{body}\n")
    uses_sdk = {"yes": True, "no": False}.get(sdk, command.sdk_guess)
    lines += [f"command = {toml_value(list(argv))}", f"working_dir = {toml_value(str(cwd))}"]
    return "\n".join(lines) + "\n" + limits + (SDK_KEYS if uses_sdk else GUARD_KEYS)


def _size(n: int) -> str:
    """``8GiB`` for a whole number of GiB, else the nearest format_bytes without its space."""
    return f"{n >> 30}GiB" if n % (1 << 30) == 0 else format_bytes(n).replace(" ", "")


def init(args: argparse.Namespace, argv: list[str]) -> int:
    """Write the file; 0 done, 2 when it exists or the command cannot be used."""
    from supervisor.cli.oneline import UsageError, classify, job_name
    from supervisor.daemon.footprint import system_memory

    out = (args.output or paths.default_config_path()).expanduser().absolute()
    cwd = Path.cwd()
    try:
        name = job_name(classify(argv, cwd), args.name) if argv else (args.name or "train")
        text = HEADER.format(path=out, name=name) + "\n" + job_text(name, argv, args.budget, args.sdk, cwd,
                                                                      system_memory()[1])
    except (UsageError, ValueError) as exc:
        print(f"mlxsupctl init: {exc}", file=sys.stderr)
        return 2
    return _write(out, text)


def _write(out: Path, text: str) -> int:
    if out.exists():
        print(f"mlxsupctl init: {out} exists; not overwritten (edit it, or give -o FILE)", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    try:
        load_config(tmp)
    except ConfigError as exc:
        tmp.unlink()
        print(f"mlxsupctl init: the config would not load: {exc}", file=sys.stderr)
        return 2
    try:
        os.link(tmp, out)  # fails if the file appeared meanwhile: never overwrite
    except FileExistsError:
        print(f"mlxsupctl init: {out} exists; not overwritten", file=sys.stderr)
        return 2
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out}\n  mlxsupd -c {out}    # or: mlxsupctl service install -c {out}")
    return 0

