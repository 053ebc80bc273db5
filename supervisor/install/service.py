"""``mlxsupctl service install|uninstall|status|restart|reload``: mlxsupd under launchd (macOS) or systemd (Linux).

``--dry-run`` prints the file and the commands instead of writing or running anything; ``--platform`` renders
either platform's file on any machine. The file is written 0644 (launchd refuses a LaunchDaemon plist that group
or others can write).

Exit status: 0 ok, 1 not installed / not running (status, restart, reload), 2 usage or config error, 3 the service
manager (launchctl, systemctl) failed or is missing; the file is still written (install) or removed (uninstall).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from supervisor import paths
from supervisor.config import Config, ConfigError, load_config
from supervisor.install.managers import Launchd, ManagerError, Systemd, manager_for, report
from supervisor.install.units import (
    DEFAULT_STOP_TIMEOUT,
    current_platform,
    daemon_log_dir,
    render_service,
    service_path,
    stop_timeout,
)

EXAMPLE_CONFIG = "deploy/mlxsup.example.toml"
EXIT_OK, EXIT_NOT_RUNNING, EXIT_USAGE, EXIT_MANAGER = 0, 1, 2, 3
ACTIONS = ("install", "uninstall", "status", "restart", "reload")


@dataclasses.dataclass
class _Request:
    action: str
    platform: str
    system: bool
    dry_run: bool
    config: Path
    memory_max: str | None
    json: bool = False

    @property
    def path(self) -> Path:
        return service_path(self.platform, self.system)

    def manager(self, exit_timeout: float = DEFAULT_STOP_TIMEOUT) -> Launchd | Systemd:
        return manager_for(self.platform, self.system, exit_timeout)


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


def _print_plan(req: _Request, verb: str, content: bytes | None) -> None:
    print(f"# dry run: nothing is written or run\n# would {verb} {req.path}")
    if content is not None:
        print(content.decode(), end="")
    print("# would run:")
    for line in req.manager().plan(req.action, str(req.path)):
        print(line)


def _write(path: Path, content: bytes) -> None:
    """Atomically, 0644: launchd refuses a LaunchDaemon plist that group or others can write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.chmod(0o644)
    tmp.replace(path)


def _install(req: _Request) -> int:
    config = _load(req)
    if config is None:
        return EXIT_USAGE
    try:
        content = render_service(config, req.platform, req.system, req.memory_max)
    except ValueError as exc:
        print(f"mlxsupctl service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if req.dry_run:
        _print_plan(req, "write", content)
        return EXIT_OK
    manager = req.manager(stop_timeout(config))
    existed = req.path.exists()
    try:
        if isinstance(manager, Launchd):
            manager.unload()  # the previous instance must leave its domain before a bootstrap can succeed
        _write(req.path, content)
        print(f"wrote {req.path}")
        if req.platform == "macos":  # launchd does not create the directory of StandardOutPath
            daemon_log_dir(config, "macos", req.system).mkdir(parents=True, exist_ok=True)
    except ManagerError as exc:
        report(exc)
        return EXIT_MANAGER
    except OSError as exc:
        print(f"mlxsupctl service: cannot write {req.path}: {exc}" + ("; run with sudo" if req.system else ""),
              file=sys.stderr)
        return EXIT_USAGE
    try:
        manager.load(str(req.path))
    except ManagerError as exc:
        report(exc)
        print(f"mlxsupctl service: {req.path} is written but the service manager did not load it", file=sys.stderr)
        return EXIT_MANAGER
    if existed and isinstance(manager, Systemd):
        print("note: the unit was already installed; `mlxsupctl service restart` applies the new one")
    return EXIT_OK


def _uninstall(req: _Request) -> int:
    if req.dry_run:
        _print_plan(req, "remove", None)
        return EXIT_OK
    if not req.path.exists():
        print(f"not installed: {req.path} does not exist")
        return EXIT_OK
    manager, ok = req.manager(), True
    try:
        manager.unload()
    except ManagerError as exc:
        report(exc)
        ok = False
    req.path.unlink()
    print(f"removed {req.path}")
    if isinstance(manager, Systemd):
        try:
            manager.forget()
        except ManagerError as exc:
            report(exc)
            ok = False
    if not ok:
        print("mlxsupctl service: the file is removed but the service manager may still have the service "
              "loaded (see the error above)", file=sys.stderr)
    return EXIT_OK if ok else EXIT_MANAGER


def _status(req: _Request) -> int:
    installed = req.path.exists()
    if req.dry_run:
        print(f"service file: {req.path} ({'installed' if installed else 'not installed'})")
        print("# would run:\n" + "\n".join(req.manager().plan("status", str(req.path))))
        return EXIT_OK
    try:
        state = req.manager().state()
    except ManagerError as exc:
        print(f"service file: {req.path} ({'installed' if installed else 'not installed'})")
        report(exc)
        return EXIT_MANAGER
    if req.json:
        print(json.dumps({"file": str(req.path), "installed": installed, **state.to_json()}, indent=2))
    else:
        running = f"yes (pid {state.pid})" if state.running else f"no ({state.state})"
        print(f"service file: {req.path} ({'installed' if installed else 'not installed'})\n"
              f"manager: {req.manager().name}\nloaded: {'yes' if state.loaded else 'no'}\nrunning: {running}\n"
              f"last exit: {state.last_exit or 'unknown'}")
    return EXIT_OK if installed and state.running else EXIT_NOT_RUNNING


def _signal(req: _Request) -> int:
    """restart (launchctl kickstart -k / systemctl restart) or reload (SIGHUP: reread the config)."""
    if req.dry_run:
        print("# would run:\n" + "\n".join(req.manager().plan(req.action, str(req.path))))
        return EXIT_OK
    if not req.path.exists():
        print(f"mlxsupctl service: not installed ({req.path} does not exist); `mlxsupctl service install` first",
              file=sys.stderr)
        return EXIT_NOT_RUNNING
    manager = req.manager()
    try:
        manager.restart() if req.action == "restart" else manager.reload()
    except ManagerError as exc:
        report(exc)
        return EXIT_MANAGER
    return EXIT_OK


def add_service_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``service ACTION`` to a ctl parser (``args.config`` comes from the parent)."""
    p = subparsers.add_parser(
        "service", help="install mlxsupd as a launchd/systemd service, or control it",
        description="Install, remove, inspect, restart or reload (reread the config) mlxsupd as a launchd (macOS) "
        "or systemd (Linux) service running the config with this interpreter. Exit status: 0 ok, 1 not "
        "installed/running, 2 usage or config error, 3 service manager error.")
    p.add_argument("service_action", choices=ACTIONS, metavar="|".join(ACTIONS))
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
    """Carry out ``service ACTION``; returns the exit status."""
    config = Path(getattr(args, "config", None) or paths.default_config_path()).expanduser()
    req = _Request(action=args.service_action, platform=getattr(args, "platform", None) or current_platform(),
                   system=bool(getattr(args, "system", False)), dry_run=bool(getattr(args, "dry_run", False)),
                   config=config.absolute(), memory_max=getattr(args, "memory_max", None),
                   json=bool(getattr(args, "json", False)))
    if req.platform != current_platform() and not req.dry_run:
        print(f"mlxsupctl service: cannot {req.action} a {req.platform} service on {current_platform()}; "
              "add --dry-run to only render it", file=sys.stderr)
        return EXIT_USAGE
    if req.memory_max and req.platform == "macos":
        print("note: --memory-max applies to systemd units only; launchd has no such limit", file=sys.stderr)
    handlers = {"install": _install, "uninstall": _uninstall, "status": _status, "restart": _signal,
                "reload": _signal}
    return handlers[req.action](req)


def main(argv: list[str] | None = None) -> int:
    """``python -m supervisor.install.service ACTION [options]``, as ``mlxsupctl service``."""
    parser = argparse.ArgumentParser(prog="python -m supervisor.install.service")
    add_service_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["service", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
