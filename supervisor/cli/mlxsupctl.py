"""``mlxsupctl``: control a running mlxsupd (one-shot commands, an interactive shell, tail, top, plot).

Exit status: 0 success; 1 the daemon refused the request (error reply: unknown job, wrong state, bad
value, forbidden for the key's role); 2 usage or config error; 3 no reply from the daemon (not running, wrong
endpoint, not authorized).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from supervisor import paths
from supervisor.control.client import TIMEOUT, ControlClient, UsageError, curve_keys
from supervisor.control.commands import CLI_COMMANDS, ControlError

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxsupctl", description="Control a running mlxsupd. Without a command: an interactive shell.",
        epilog="Exit status: 0 ok, 1 refused by the daemon (also: forbidden for the key's role), 2 usage/config "
               "error, 3 daemon unreachable. Every command, and the control protocol: read docs/running.md")
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help=f"config of the daemon, to find its socket (default: {paths.default_config_path()})")
    parser.add_argument("-s", "--server", default=None, help="control endpoint, e.g. tcp://host:7781")
    parser.add_argument("--events", default=None, help="event endpoint (default: next to the control socket)")
    parser.add_argument("--key", type=Path, default=None, help="client secret key file (CURVE) for tcp")
    parser.add_argument("--server-key", type=Path, default=None,
                        help="daemon's public key file (default: server.key next to --key)")
    parser.add_argument("--json", action="store_true", help="print results as JSON (for scripts)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply (default 5)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in CLI_COMMANDS.items():
        command_parser = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(command_parser)
        # --json after the command too; SUPPRESS keeps the top-level value when it is not given here.
        command_parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                                    help="print the result as JSON (for scripts)")
    _local_parsers(sub)
    return parser


def _local_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = sub.add_parser("keygen", help="make a CURVE keypair (NAME.key public, NAME.key_secret secret)")
    keygen.add_argument("name", help="e.g. server, or a client's name")
    keygen.add_argument("--dir", type=Path, default=Path("."), help="where to write the files (default .)")
    top = sub.add_parser("top", help="live table of every job: state, progress, memory vs budget, leak rate")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument("--seconds", type=float, default=None, help="stop after this long")
    plot = sub.add_parser("plot", help="memory vs step and time for a job, from its recorded telemetry")
    plot.add_argument("job")
    plot.add_argument("-o", "--output", type=Path, default=None, help="PNG or SVG file (default JOB-memory.png)")
    from supervisor.cli.dashboard import add_arguments as add_dashboard_arguments

    add_dashboard_arguments(sub)
    doctor = sub.add_parser("doctor", help="check this machine before a first run (PASS/WARN/FAIL with the fix)",
                            description="Check Python, MLX, the footprint readers, memory, the run dir, the "
                            "config, the service manager and the daemon. Exit status 0 when nothing fails.")
    doctor.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the checks as JSON")
    doctor.add_argument("--deep", action="store_true", help="also run the acceptance kit (real allocations, "
                        "supervised leaking jobs, a SIGKILL mid-checkpoint, launchd on macOS: about a minute) and "
                        "print its table for a bug report")
    doctor.add_argument("--out", type=Path, default=None, help="with --deep: also write the kit's JSON report here")
    from supervisor.cli.init import add_parser as add_init_parser

    add_init_parser(sub)
    try:
        from supervisor.install.service import add_service_parser
    except ImportError:  # pragma: no cover - the module ships with the package
        return
    add_service_parser(sub)


def endpoints(args: argparse.Namespace) -> tuple[str, str]:
    """Control and event endpoints from -s/--events, the config, or the default run dir."""
    if args.server:
        return args.server, args.events or ""
    config_path = args.config or paths.default_config_path()
    run_dir = paths.default_run_dir()
    if args.config is not None or config_path.exists():
        from supervisor.config import load_config

        run_dir = load_config(config_path).run_dir
    return f"ipc://{run_dir / 'control.sock'}", args.events or f"ipc://{run_dir / 'events.sock'}"


def connect(args: argparse.Namespace) -> tuple[ControlClient, str]:
    control, events = endpoints(args)
    curve = curve_keys(args.key, args.server_key) if args.key else None
    return ControlClient(control, timeout=args.timeout, curve=curve), events


def show(args: argparse.Namespace, result: Any, render: Any) -> None:
    print(json.dumps(result, indent=2, default=str) if args.json else render(result))


def run_command(args: argparse.Namespace, client: ControlClient, events: str) -> int:
    command = CLI_COMMANDS[args.command]
    if args.command == "tail" and args.follow:
        from supervisor.cli.live import follow

        return follow(client, events, command.to_wire(args), args.json, args.seconds)
    result = client.call(args.command, command.to_wire(args))
    show(args, result, command.render)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in argv and "init" in argv[:argv.index("--")]:  # mlxsupctl init [OPTIONS] -- CMD [ARGS...]
        argv, command = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if args.command == "init":
        from supervisor.cli.init import init

        return init(args, command)
    if args.command == "keygen":
        from supervisor.cli.live import keygen

        return keygen(args.name, args.dir)
    if args.command == "service":
        return int(args.func(args))
    if args.command == "doctor":
        from supervisor.cli.doctor import doctor

        return doctor(args.config, args.json, deep=args.deep, out=args.out)
    try:
        if args.command == "plot":
            from supervisor.cli.live import plot

            return plot(args, connect)
        client, events = connect(args)
    except ControlError as exc:
        print(f"mlxsupctl: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # ConfigError and friends: name the bad value
        print(f"mlxsupctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command is None:
            from supervisor.cli.live import shell

            return shell(client, args, events)
        if args.command == "top":
            from supervisor.cli.live import top

            return top(client, events, args.once, args.seconds)
        if args.command in ("dashboard", "metrics"):
            from supervisor.cli import dashboard

            return int(getattr(dashboard, args.command)(args, client, events))
        return run_command(args, client, events)
    except UsageError as exc:
        print(f"mlxsupctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"mlxsupctl: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE if exc.code == TIMEOUT else EXIT_REFUSED
    except (KeyboardInterrupt, BrokenPipeError):
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
