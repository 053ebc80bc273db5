"""``mlxsupctl service install|uninstall|status``: run mlxsupd under launchd (macOS) or systemd (Linux).

The service file runs ``<python> -m supervisor.cli.mlxsupd -c <config>`` with absolute paths: the interpreter is
``sys.executable`` made absolute but *not* symlink-resolved (a venv's ``bin/python`` is a symlink to the base
interpreter, and resolving it would lose the venv's packages). ``--dry-run`` prints the file and the commands
instead of writing or running anything; ``--platform`` renders either platform's file on any machine.

Exit status: 0 ok, 1 not installed / not running (status), 2 usage or config error, 3 the service manager
(launchctl, systemctl) failed or is missing; the file is still written (install) or removed (uninstall).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import plistlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

from supervisor import paths
from supervisor.config import Config, ConfigError, load_config
from supervisor.core.sizes import SizeError, parse_bytes

LABEL = "com.mlx-supervisor.mlxsupd"
UNIT = "mlxsupd.service"
DEFAULT_STOP_TIMEOUT = 120  # s: launchd ExitTimeOut / systemd TimeoutStopSec when the config asks for less
STOP_MARGIN = 30  # s: on top of the slowest job's checkpoint_timeout + kill_grace
THROTTLE_INTERVAL = 10  # s: launchd's minimum time between restarts (systemd: RestartSec)
EXAMPLE_CONFIG = "deploy/mlxsup.example.toml"
EXIT_OK, EXIT_NOT_RUNNING, EXIT_USAGE, EXIT_MANAGER = 0, 1, 2, 3
# ProcessType Standard, not Background: launchd applies "darwinbg" policy to Background jobs (low CPU
# priority, throttled disk I/O, efficiency cores on Apple Silicon) and every worker inherits it, so training
# would crawl. Adaptive is for XPC services that are boosted on demand; Interactive is for GUI apps.
PROCESS_TYPE = "Standard"
PLIST_NOTE = """
     mlxsupd {kind}, rendered by `mlxsupctl service install` (supervisor/install/units.py).
     KeepAlive SuccessfulExit=false: restarted after a crash, not after a clean stop (exit 0).
     ExitTimeOut: seconds from SIGTERM to SIGKILL, long enough for every job to checkpoint.
     ProcessType Standard: Background would throttle CPU and I/O of the daemon and all its workers.{extra}
"""

Command = tuple[list[str], bool]  # argv, and whether a failure is expected and harmless


def current_platform() -> str:
    """``macos`` or ``linux``: the platform whose service manager this machine runs."""
    return "macos" if sys.platform == "darwin" else "linux"


def stop_timeout(config: Config | None) -> int:
    """Seconds the service manager must wait after SIGTERM: every job checkpoints, in parallel."""
    if config is None or not config.jobs:
        return DEFAULT_STOP_TIMEOUT
    slowest = max(job.checkpoint_timeout + job.kill_grace for job in config.jobs.values())
    return max(DEFAULT_STOP_TIMEOUT, math.ceil(slowest) + STOP_MARGIN)


def daemon_program() -> list[str]:
    """argv prefix that runs mlxsupd with this interpreter (absolute, symlinks kept: see module doc)."""
    return [os.path.abspath(sys.executable), "-m", "supervisor.cli.mlxsupd"]


def _search_path(program0: str, platform: str) -> str:
    extra = ["/opt/homebrew/bin"] if platform == "macos" else []
    dirs = [os.path.dirname(program0), *extra, "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
    return ":".join(dict.fromkeys(dirs))


def _argv(program: list[str], config: Path) -> list[str]:
    if not program or not os.path.isabs(program[0]):
        raise ValueError(f"program must start with an absolute path, got {program!r}")
    if not config.is_absolute():
        raise ValueError(f"config path must be absolute, got {str(config)!r}")
    return [*program, "-c", str(config)]


def render_plist(program: list[str], config: Path, log_dir: Path, working_dir: Path, label: str = LABEL,
                 system: bool = False, exit_timeout: int = DEFAULT_STOP_TIMEOUT,
                 env: dict[str, str] | None = None) -> bytes:
    """A launchd LaunchAgent (``system=False``) or LaunchDaemon plist running mlxsupd with ``config``."""
    argv = _argv(program, config)
    plist = {
        "Label": label,
        "ProgramArguments": argv,
        "WorkingDirectory": str(working_dir),
        "EnvironmentVariables": {"PATH": _search_path(argv[0], "macos"), "PYTHONUNBUFFERED": "1",
                                 **(env or {})},
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL,
        "ExitTimeOut": int(exit_timeout),
        "ProcessType": PROCESS_TYPE,
        "StandardOutPath": str(log_dir / "mlxsupd.out.log"),
        "StandardErrorPath": str(log_dir / "mlxsupd.err.log"),
    }
    data = plistlib.dumps(plist, sort_keys=False)
    kind, extra = ("LaunchDaemon (system)", "\n     A LaunchDaemon runs as root: add UserName to train as an "
                   "ordinary user.") if system else ("LaunchAgent (per user)", "")
    note = PLIST_NOTE.format(kind=kind, extra=extra)
    head, sep, rest = data.partition(b"<plist ")
    return head + f"<!--{note}-->\n".encode() + sep + rest


def _systemd_quote(arg: str, expand_vars: bool = True) -> str:
    """One word for a systemd ExecStart=/Environment= line: specifiers and variables escaped, quoted."""
    arg = arg.replace("%", "%%")
    if expand_vars:
        arg = arg.replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _memory_max(value: str) -> str:
    """systemd's MemoryMax syntax as is (48G, 80%, infinity), else one of our sizes (48GiB) in bytes."""
    value = value.strip()
    if re.fullmatch(r"\d+[KMGT]?|\d+(\.\d+)?%|infinity", value):
        return value
    try:
        return str(parse_bytes(value))
    except SizeError as exc:
        raise ValueError(f"--memory-max {value!r}: {exc}") from None


def render_unit(program: list[str], config: Path, working_dir: Path, system: bool = False,
                timeout_stop: int = DEFAULT_STOP_TIMEOUT, memory_max: str | None = None) -> str:
    """A systemd service unit (user unit, or system unit with ``system=True``) running mlxsupd."""
    argv = _argv(program, config)
    path_env = _systemd_quote("PATH=" + _search_path(argv[0], "linux"), expand_vars=False)
    fence = f"MemoryMax={_memory_max(memory_max)}" if memory_max else "#MemoryMax=64G"
    lines = [
        f"# mlxsupd {'system' if system else 'user'} unit, rendered by `mlxsupctl service install`"
        " (supervisor/install/units.py).",
        "[Unit]",
        "Description=mlx-supervisor: MLX training under hard memory budgets (mlxsupd)",
        *(["After=network.target"] if system else []),
        "",
        "[Service]",
        *(["# A system unit runs as root: add User= to train as an ordinary user."] if system else []),
        "Type=simple",
        "ExecStart=" + " ".join(_systemd_quote(a) for a in argv),
        "# The daemon rereads its config on SIGHUP.",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WorkingDirectory=" + str(working_dir).replace("%", "%%"),
        "Environment=PYTHONUNBUFFERED=1",
        f"Environment={path_env}",
        "# Restart after a crash, not after a clean stop (exit 0).",
        "Restart=on-failure",
        f"RestartSec={THROTTLE_INTERVAL}",
        "# SIGTERM to mlxsupd only: it asks every worker to checkpoint and exit, then exits itself.",
        "# Whatever is left when TimeoutStopSec runs out gets SIGKILL, workers included.",
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(timeout_stop)}",
        "# Optional outer fence around the daemon and all its workers (the budgets are the inner one);",
        "# `mlxsupctl service install --memory-max 64G` sets it. User units need the memory controller",
        "# delegated to the user manager (the default on current systemd).",
        fence,
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
    ]
    return "\n".join(lines) + "\n"


def service_path(platform: str, system: bool) -> Path:
    """Where the service file goes; per-user paths follow HOME / XDG_CONFIG_HOME from the environment."""
    home = Path(os.environ.get("HOME") or Path.home())
    if platform == "macos":
        folder = Path("/Library/LaunchDaemons") if system else home / "Library" / "LaunchAgents"
        return folder / f"{LABEL}.plist"
    if system:
        return Path("/etc/systemd/system") / UNIT
    return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "systemd" / "user" / UNIT


def _log_dir(config: Config, platform: str, system: bool) -> Path:
    """The daemon's stdout/stderr directory (launchd only; systemd uses the journal)."""
    if config.daemon.log_dir or config.daemon.state_dir:
        return config.log_dir
    if system:
        return Path("/Library/Logs") / paths.APP
    if platform == current_platform():
        return paths.default_log_dir()
    return Path(os.environ.get("HOME") or Path.home()) / "Library" / "Logs" / paths.APP


def _commands(platform: str, system: bool, action: str, path: Path) -> tuple[list[Command], list[Command]]:
    """Manager commands to run before and after the file is written (install) or removed (uninstall)."""
    if platform == "macos":
        domain = "system" if system else f"gui/{os.getuid()}"
        target = f"{domain}/{LABEL}"
        return {
            "install": ([(["launchctl", "bootout", target], True)],
                        [(["launchctl", "bootstrap", domain, str(path)], False)]),
            "uninstall": ([(["launchctl", "bootout", target], True)], []),
            "status": ([(["launchctl", "print", target], False)], []),
        }[action]
    ctl = ["systemctl"] if system else ["systemctl", "--user"]
    return {
        "install": ([], [([*ctl, "daemon-reload"], False), ([*ctl, "enable", "--now", UNIT], False)]),
        "uninstall": ([([*ctl, "disable", "--now", UNIT], False)], [([*ctl, "daemon-reload"], False)]),
        "status": ([([*ctl, "status", "--no-pager", UNIT], False)], []),
    }[action]


def _hint(argv: list[str], output: str) -> str:
    if "Failed to connect to bus" in output and "--user" in argv:
        return ("no systemd user manager is reachable from this session (ssh/su/container?): log in "
                "normally, or `loginctl enable-linger $USER`, or install the system unit with --system")
    if any(s in output for s in ("Failed to connect to bus", "Permission denied", "Operation not permitted")):
        return "the system service manager needs root: run with sudo"
    if "Domain does not support" in output:
        return "no GUI session for this user (ssh?): log in at the Mac, or use --system (LaunchDaemon)"
    if "Input/output error" in output:
        return "already loaded, or the plist is invalid: check `plutil -lint FILE` and the err.log"
    return ""


def _run(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run one manager command; (exit status or None when it could not run, its combined output)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return None, f"{argv[0]} not found: is this machine's service manager installed?"
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return None, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _run_all(commands: list[Command], timeout: float) -> bool:
    """Run commands in order, echoing each; on the first real failure report it on stderr and stop."""
    for argv, tolerant in commands:
        print(f"$ {shlex.join(argv)}")
        status, output = _run(argv, timeout)
        if status == 0 or (tolerant and status is not None):
            if output:
                print(output if status == 0 else f"(ignored) {output}")
            continue
        why = f"exit {status}" if status is not None else "could not run"
        _report(argv, f"failed ({why}): {output}", output)
        return False
    return True


def _report(argv: list[str], what: str, output: str) -> None:
    hint = _hint(argv, output)
    print(f"mlxsupctl service: `{shlex.join(argv)}` {what}" + (f"\n  hint: {hint}" if hint else ""),
          file=sys.stderr)


@dataclasses.dataclass
class _Request:
    action: str
    platform: str
    system: bool
    dry_run: bool
    config: Path
    memory_max: str | None

    @property
    def path(self) -> Path:
        return service_path(self.platform, self.system)


def _render(req: _Request, config: Config) -> bytes:
    program, timeout, workdir = daemon_program(), stop_timeout(config), config.path.parent
    if req.platform == "macos":
        return render_plist(program, config.path, _log_dir(config, "macos", req.system), workdir,
                            system=req.system, exit_timeout=timeout)
    return render_unit(program, config.path, workdir, req.system, timeout, req.memory_max).encode()


def _load(req: _Request) -> Config | None:
    if not req.config.exists():
        print(f"mlxsupctl service: config file {req.config} does not exist; create it first (start from "
              f"{EXAMPLE_CONFIG}) or pass -c PATH", file=sys.stderr)
        return None
    try:
        return load_config(req.config)
    except ConfigError as exc:
        print(f"mlxsupctl service: config error: {exc}", file=sys.stderr)
        return None


def _print_plan(path: Path, verb: str, content: bytes | None, before: list[Command],
                after: list[Command]) -> None:
    print(f"# dry run: nothing is written or run\n# would {verb} {path}")
    if content is not None:
        print(content.decode(), end="")
    print("# would run:")
    for argv, tolerant in [*before, *after]:
        print(shlex.join(argv) + ("    # may fail harmlessly: not loaded yet" if tolerant else ""))


def _install(req: _Request) -> int:
    config = _load(req)
    if config is None:
        return EXIT_USAGE
    try:
        content = _render(req, config)
    except ValueError as exc:
        print(f"mlxsupctl service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    before, after = _commands(req.platform, req.system, "install", req.path)
    if req.dry_run:
        _print_plan(req.path, "write", content, before, after)
        return EXIT_OK
    timeout = stop_timeout(config) + 30.0
    if not _run_all(before, timeout):
        return EXIT_MANAGER
    existed = req.path.exists()
    req.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = req.path.with_name(req.path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(req.path)
    print(f"wrote {req.path}")
    if req.platform == "macos":  # launchd does not create the directory of StandardOutPath
        _log_dir(config, "macos", req.system).mkdir(parents=True, exist_ok=True)
    if not _run_all(after, timeout):
        print(f"mlxsupctl service: {req.path} is written but the service manager did not load it",
              file=sys.stderr)
        return EXIT_MANAGER
    if existed and req.platform == "linux":
        ctl = "systemctl" if req.system else "systemctl --user"
        print(f"note: the unit was already installed; `{ctl} restart {UNIT}` applies the new one")
    return EXIT_OK


def _uninstall(req: _Request) -> int:
    before, after = _commands(req.platform, req.system, "uninstall", req.path)
    if req.dry_run:
        _print_plan(req.path, "remove", None, before, after)
        return EXIT_OK
    if not req.path.exists():
        print(f"not installed: {req.path} does not exist")
        return EXIT_OK
    timeout = DEFAULT_STOP_TIMEOUT * 10.0  # a safety net: the manager bounds the stop by its own timeout
    ok = _run_all(before, timeout)
    req.path.unlink()
    print(f"removed {req.path}")
    ok = ok and _run_all(after, timeout)
    if not ok:
        print("mlxsupctl service: the file is removed but the service manager may still have the service "
              "loaded (see the error above)", file=sys.stderr)
    return EXIT_OK if ok else EXIT_MANAGER


def _status(req: _Request) -> int:
    installed = req.path.exists()
    before, _ = _commands(req.platform, req.system, "status", req.path)
    argv = before[0][0]
    print(f"service file: {req.path} ({'installed' if installed else 'not installed'})")
    if req.dry_run:
        print(f"# would run:\n{shlex.join(argv)}")
        return EXIT_OK
    print(f"$ {shlex.join(argv)}")
    status, output = _run(argv, 30.0)
    if output:
        print(output)
    if status is None or "Failed to connect to bus" in output:
        _report(argv, "could not ask the service manager", output)
        return EXIT_MANAGER
    return EXIT_OK if installed and status == 0 else EXIT_NOT_RUNNING


def add_service_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``service install|uninstall|status`` to a ctl parser (``args.config`` comes from the parent)."""
    p = subparsers.add_parser(
        "service", help="install mlxsupd as a launchd/systemd service",
        description="Install, remove or inspect mlxsupd as a launchd (macOS) or systemd (Linux) service "
        "running the config with this interpreter. Exit status: 0 ok, 1 not installed/running (status), "
        "2 usage or config error, 3 service manager error.")
    p.add_argument("service_action", choices=["install", "uninstall", "status"],
                   metavar="install|uninstall|status")
    p.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    p.add_argument("--platform", choices=["macos", "linux"], default=current_platform(),
                   help="render for this platform (default: %(default)s); another one needs --dry-run")
    p.add_argument("--system", action="store_true",
                   help="LaunchDaemon / system unit (needs root) instead of the per-user service")
    p.add_argument("--memory-max", default=None, metavar="SIZE",
                   help="systemd MemoryMax= for the whole service (e.g. 64G), an outer fence")
    p.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS,
                   help=f"config file (default: {paths.default_config_path()})")
    p.set_defaults(func=run_service)


def run_service(args: argparse.Namespace) -> int:
    """Carry out ``service install|uninstall|status``; returns the exit status."""
    config = Path(getattr(args, "config", None) or paths.default_config_path()).expanduser()
    req = _Request(action=args.service_action, platform=getattr(args, "platform", None) or current_platform(),
                   system=bool(getattr(args, "system", False)), dry_run=bool(getattr(args, "dry_run", False)),
                   config=config.absolute(), memory_max=getattr(args, "memory_max", None))
    if req.platform != current_platform() and not req.dry_run:
        print(f"mlxsupctl service: cannot {req.action} a {req.platform} service on {current_platform()}; "
              "add --dry-run to only render it", file=sys.stderr)
        return EXIT_USAGE
    if req.memory_max and req.platform == "macos":
        print("note: --memory-max applies to systemd units only; launchd has no such limit", file=sys.stderr)
    return {"install": _install, "uninstall": _uninstall, "status": _status}[req.action](req)


def main(argv: list[str] | None = None) -> int:
    """``python -m supervisor.install.units install|uninstall|status [options]``, as ``mlxsupctl service``."""
    parser = argparse.ArgumentParser(prog="python -m supervisor.install.units")
    add_service_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
