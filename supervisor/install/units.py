"""The service files that run mlxsupd: a launchd plist (macOS) or a systemd unit (Linux), and where they go.

The service file runs ``<python> -m supervisor.cli.mlxsupd -c <config>`` with absolute paths: the interpreter is
``sys.executable`` made absolute but *not* symlink-resolved (a venv's ``bin/python`` is a symlink to the base
interpreter, and resolving it would lose the venv's packages). ``supervisor.install.service`` is the
``mlxsupctl service`` command that writes them and drives the manager.
"""

from __future__ import annotations

import math
import os
import plistlib
import re
import sys
from pathlib import Path

from protocol.darwin import is_macos
from supervisor import paths
from supervisor.config import Config
from supervisor.core.sizes import SizeError, parse_bytes
from supervisor.install.managers import LABEL, UNIT

DEFAULT_STOP_TIMEOUT = 120  # s: launchd ExitTimeOut / systemd TimeoutStopSec when the config asks for less
STOP_MARGIN = 30  # s: on top of the slowest job's checkpoint_timeout + kill_grace
THROTTLE_INTERVAL = 10  # s: launchd's minimum time between restarts (systemd: RestartSec)
# ProcessType Interactive: per launchd.plist(5), Standard is the same as leaving the key out, and such jobs get
# "light resource limits" that throttle CPU and I/O; Background is throttled harder (darwinbg). Descendants inherit
# the policy, so every worker would train throttled. Interactive is the type for a job that must not be throttled.
PROCESS_TYPE = "Interactive"
PLIST_NOTE = """
     mlxsupd {kind}, rendered by `mlxsupctl service install` (supervisor/install/units.py).
     KeepAlive SuccessfulExit=false: restarted after a crash, not after a clean stop (exit 0).
     ExitTimeOut: seconds from SIGTERM to SIGKILL, long enough for every job to checkpoint.
     ProcessType Interactive: Standard (the default) and Background get resource limits that throttle CPU and
     I/O, and every worker inherits them; Interactive is the type launchd does not throttle.{extra}
"""


def current_platform() -> str:
    """``macos`` or ``linux``: the platform whose service manager this machine runs."""
    return "macos" if is_macos() else "linux"


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


def daemon_log_dir(config: Config, platform: str, system: bool) -> Path:
    """The daemon's stdout/stderr directory (launchd only; systemd uses the journal)."""
    if config.daemon.log_dir or config.daemon.state_dir:
        return config.log_dir
    if system:
        return Path("/Library/Logs") / paths.APP
    if platform == current_platform():
        return paths.default_log_dir()
    return Path(os.environ.get("HOME") or Path.home()) / "Library" / "Logs" / paths.APP




def render_service(config: Config, platform: str, system: bool, memory_max: str | None = None) -> bytes:
    """The service file running mlxsupd with ``config`` and this interpreter; ValueError names a bad option."""
    program, timeout, workdir = daemon_program(), stop_timeout(config), config.path.parent
    if platform == "macos":
        # The CLI finds the daemon's sockets under $TMPDIR: give the LaunchAgent the same one as the installing
        # user's shell, should launchd not set it. A LaunchDaemon (root) keeps root's own.
        temp = None if system or platform != current_platform() else paths.darwin_user_temp_dir()
        env = {"TMPDIR": str(temp)} if temp is not None else None
        return render_plist(program, config.path, daemon_log_dir(config, "macos", system), workdir,
                            system=system, exit_timeout=timeout, env=env)
    return render_unit(program, config.path, workdir, system, timeout, memory_max).encode()
