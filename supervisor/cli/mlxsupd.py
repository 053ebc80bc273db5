"""``mlxsupd``: the supervisor daemon.

  mlxsupd -c CONFIG                     supervise every job of CONFIG in the foreground (service mode)
  mlxsupd run -c CONFIG JOB [--summary]  supervise one job until it finishes, then print a JSON summary
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supervisor import paths
from supervisor.config import ConfigError, load_config
from supervisor.daemon.logs import configure

EXIT_CONFIG = 2


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
        "(as launchd and systemd expect). Exit status: 0 ok, 1 job did not finish, 2 config or usage error.",
        parents=[_common(False)],
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", parents=[_common(True)],
                         help="supervise one job in the foreground until it finishes or gives up")
    run.add_argument("job", help="name of a job in the config")
    run.add_argument("--summary", type=Path, default=None, help="also write the JSON summary to this file")
    run.add_argument("--max-seconds", type=float, default=None, help="give up (stop the job) after this long")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config_path = args.config or paths.default_config_path()
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"mlxsupd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    sink = None
    if config.daemon.log_file:
        from supervisor.core.sizes import parse_bytes
        from supervisor.daemon.logs import RotatingFile

        sink = RotatingFile(config.resolve(config.daemon.log_file, config.log_dir / "mlxsupd.log"),
                            parse_bytes(config.daemon.log_max_bytes), config.daemon.log_keep)
    configure(args.log_format or config.daemon.log_format, args.log_level, sink)
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
            return run_one(config, args.job, args.summary, args.max_seconds)
        except RunDirError as exc:
            print(f"mlxsupd: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    from supervisor.daemon.rundir import RunDirError
    from supervisor.daemon.server import serve

    try:
        return serve(config)
    except (ConfigError, RunDirError) as exc:
        print(f"mlxsupd: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
