"""``mlxsupd``: the supervisor daemon.

  mlxsupd -c CONFIG                     supervise every job of CONFIG in the foreground (service mode)
  mlxsupd run -c CONFIG JOB [--summary]  supervise one job until it finishes, then print a JSON summary
  mlxsupd run [OPTIONS] -- CMD [ARGS]   the same for any command, with no config file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supervisor import paths
from supervisor.config import Config, ConfigError, load_config
from supervisor.daemon.logs import configure

EXIT_CONFIG = 2


# The last words of --help: the page of the manual to read (the source tree's docs/; README.md lists them all).
MANUAL = "The daemon, mlxsupctl and every option: read docs/running.md"
MANUAL_RUN = "Every option, the report and the summary: read docs/running.md#one-job-in-the-foreground-mlxsupd-run"


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parent.add_argument("-c", "--config", type=Path, default=default,
                        help=f"config file (default: {paths.default_config_path()})")
    parent.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=argparse.SUPPRESS if suppress else "info", help="default: info")
    parent.add_argument("--log-format", choices=["auto", "console", "json"], default=default,
                        help="override daemon.log_format")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxsupd",
        description="Supervise MLX training workers under hard memory budgets.",
        epilog="Without a subcommand, runs the daemon in the foreground for every job in the config "
        "(as launchd and systemd expect). Exit status: 0 ok, 1 job did not finish, 2 config or usage error. "
        f"{MANUAL}",
        parents=[_common(False)],
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser(
        "run", parents=[_common(True)], help="supervise one job in the foreground until it finishes or gives up",
        usage="mlxsupd run -c CONFIG JOB [--summary FILE] [--max-seconds S]\n"
              "       mlxsupd run [OPTIONS] [-c CONFIG] -- CMD [ARGS...]",
        description="Supervise one job in the foreground: a job of CONFIG, or any command given after '--' "
        "(a Python script using the Session SDK, an unmodified program guarded by sampling alone, or an mlx-lm "
        "fine-tune: mlx_lm.lora ..., mlx_lm lora ..., python -m mlx_lm lora ...). With '--', -c takes the "
        "[daemon] table and the defaults of the job of the same name from CONFIG; an option that differs from "
        "the file is an error. mlxsupctl reaches the run on its run dir (the line printed at the start).",
        epilog="At the end the JSON summary goes to stdout (and --summary) and a short report to stderr. Exit "
        "status: 0 the job finished (or did its --max-steps), 1 it did not, 2 config or usage error. Ctrl-C "
        "checkpoints an SDK worker (a guard-only one is stopped) and prints the report. "
        f"{MANUAL_RUN}")
    run.add_argument("job", nargs="?", help="name of a job in the config (the -c CONFIG JOB form)")
    run.add_argument("--summary", type=Path, default=None, help="also write the JSON summary to this file")
    run.add_argument("--max-seconds", type=float, default=None, help="give up (stop the job) after this long")
    from supervisor.cli.oneline import add_arguments

    add_arguments(run)
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Options before ``--`` and the command after it (None when there is no ``--``)."""
    if "--" not in argv:
        return argv, None
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options, command = _split(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(options)
    if extra and args.command == "run" and command is None:  # mlxsupd run --budget 4GiB python train.py
        words = " ".join([args.job or "", *extra]).strip()
        print(f"mlxsupd: put the command after '--': mlxsupd run [OPTIONS] -- {words}", file=sys.stderr)
        return EXIT_CONFIG
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    one_line = args.command == "run" and command is not None
    if (problem := _form_problem(args, command)) is not None:
        print(f"mlxsupd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if one_line:
            assert command is not None
            config, args.job = _one_line_config(args, command)
        else:
            config = load_config(args.config or paths.default_config_path())
    except ConfigError as exc:
        print(f"mlxsupd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:  # the one-line form's UsageError and OptionError name the option
        print(f"mlxsupd run: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sink = None
    if config.daemon.log_file:
        from supervisor.core.sizes import parse_bytes
        from supervisor.daemon.logs import RotatingFile

        sink = RotatingFile(config.resolve(config.daemon.log_file, config.log_dir / "mlxsupd.log"),
                            parse_bytes(config.daemon.log_max_bytes), config.daemon.log_keep)
    # The one-line form's own lines (progress, report) say what happens; its log shows warnings unless asked.
    level = "warning" if one_line and "--log-level" not in options else args.log_level
    configure(args.log_format or config.daemon.log_format, level, sink)
    if sink is not None:
        import signal

        signal.signal(signal.SIGUSR1, lambda signum, frame: sink.reopen())
    if args.command == "run":
        if args.job not in config.jobs:
            known = ", ".join(sorted(config.jobs)) or "none"
            print(f"mlxsupd: no job {args.job!r} in {config.path} (jobs: {known})", file=sys.stderr)
            return EXIT_CONFIG
        layout = config.layout(args.job)
        if layout is not None and len(layout.hosts) > 1:
            print(f"mlxsupd: job {args.job!r} is a gang over several hosts: run the daemon (mlxsupd -c CONFIG) on "
                  "each, since their daemons coordinate over the control channel, which `run` has not",
                  file=sys.stderr)
            return EXIT_CONFIG
        from supervisor.daemon.run import run_one
        from supervisor.daemon.rundir import RunDirError

        try:
            return run_one(config, args.job, args.summary, args.max_seconds, args.max_steps, args.plot)
        except (RunDirError, ConfigError) as exc:
            hint = (" (or give --state-dir DIR: the run then has a run dir of its own)"
                    if one_line and args.state_dir is None else "")
            print(f"mlxsupd: {exc}{hint}", file=sys.stderr)
            return EXIT_CONFIG
    from supervisor.daemon.rundir import RunDirError
    from supervisor.daemon.server import serve

    try:
        return serve(config)
    except (ConfigError, RunDirError) as exc:
        print(f"mlxsupd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _form_problem(args: argparse.Namespace, command: list[str] | None) -> str | None:
    """Why the command line mixes the forms (or is neither), or None."""
    if args.command != "run":
        return "'--' and a command belong to 'mlxsupd run'" if command is not None else None
    from supervisor.cli.oneline import given_one_line_options

    if command is not None and args.job is not None:
        return f"give a job of the config ({args.job!r}) or a command after '--', not both"
    if command is None and args.job is None:
        return "give the command to supervise after '--' (mlxsupd run [OPTIONS] -- CMD ...) or -c CONFIG JOB"
    named = given_one_line_options(args)
    if command is None and named:
        return (f"{', '.join(named)} apply to a command after '--' (mlxsupd run {' '.join(named[:1])} ... -- "
                f"{args.job} ...); a job of a config file takes its settings from the file")
    if args.plot is not None and args.plot.suffix.lower() not in (".png", ".svg"):
        return f"--plot {args.plot}: give a .png or .svg file"
    for option in ("max_steps", "max_attempts", "batch", "accum"):
        value = getattr(args, option)
        if value is not None and value < 1:
            return f"--{option.replace('_', '-')} {value}: must be at least 1"
    return None


def _one_line_config(args: argparse.Namespace, command: list[str]) -> tuple[Config, str]:
    from supervisor.cli.oneline import build
    from supervisor.daemon.footprint import system_memory

    return build(args, command, system_memory()[1], Path.cwd())


if __name__ == "__main__":
    sys.exit(main())
