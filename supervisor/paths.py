"""Platform default locations for config, state, logs and the private run directory, and the socket path limit."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Final

from protocol.darwin import CS_DARWIN_USER_TEMP_DIR, is_macos

APP = "mlx-supervisor"
# Every ipc endpoint the daemon binds in its run dir. A new one goes here, so that the config check and the bind
# check (``socket_path_problem``) cover it.
IPC_SOCKETS: Final = ("workers.sock", "control.sock", "events.sock")


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_config_path() -> Path:
    if is_macos():
        return _home() / "Library" / "Application Support" / APP / "mlxsup.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / APP / "mlxsup.toml"


def default_state_dir() -> Path:
    if is_macos():
        return _home() / "Library" / "Application Support" / APP
    base = os.environ.get("XDG_STATE_HOME") or str(_home() / ".local" / "state")
    return Path(base) / APP


def default_log_dir() -> Path:
    if is_macos():
        return _home() / "Library" / "Logs" / APP
    return default_state_dir() / "logs"


def darwin_user_temp_dir() -> Path | None:
    """macOS's per-user temporary directory (``/var/folders/…/T/``): $TMPDIR, else confstr's answer, else None."""
    tmpdir = os.environ.get("TMPDIR")
    if tmpdir and os.path.isabs(tmpdir):
        return Path(tmpdir)
    # CPython lists no CS_DARWIN_USER_TEMP_DIR in confstr_names: on macOS ask by number (unistd.h).
    names = getattr(os, "confstr_names", {})
    name: str | int | None = "CS_DARWIN_USER_TEMP_DIR" if "CS_DARWIN_USER_TEMP_DIR" in names else (
        CS_DARWIN_USER_TEMP_DIR if sys.platform == "darwin" else None)
    if name is None:
        return None
    try:
        value = os.confstr(name)
    except (OSError, ValueError):
        value = None
    return Path(value) if value and os.path.isabs(value) else None


def default_run_dir() -> Path:
    """Where the daemon's sockets and lock live by default.

    macOS: under the per-user $TMPDIR. macOS cleans it too (regular files not accessed in 3 days; emptied at
    boot), but its cleaner skips sockets and files held under flock, and the run dir holds only the sockets, the
    flock-held lock and a gang's MLX_HOSTFILE (rewritten before every generation, read once at the ranks' start);
    the daemon recreates the directory when it starts. Without a per-user temp dir (neither $TMPDIR nor
    confstr's), /var/run/mlxsup for root and ~/Library/Caches/mlxsup/run for others; never /tmp.
    Linux: $XDG_RUNTIME_DIR, else /tmp/mlxsup-UID.
    """
    if not is_macos():
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        return Path(runtime) / "mlxsup" if runtime else Path("/tmp") / f"mlxsup-{os.getuid()}"
    temp = darwin_user_temp_dir()
    if temp is not None:
        return temp / "mlxsup"
    if os.getuid() == 0:
        return Path("/var/run/mlxsup")
    return _home() / "Library" / "Caches" / "mlxsup" / "run"


def socket_path_limit() -> int:
    """Bytes a Unix-domain socket path may take, its terminating NUL included (``sizeof(sun_path)``)."""
    return 104 if is_macos() else 108


def socket_path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be bound as an ipc socket here (too long for ``sun_path``), or None when it can."""
    size = len(os.fsencode(path)) + 1
    limit = socket_path_limit()
    if size <= limit:
        return None
    system = "macOS" if is_macos() else "Linux"
    return (f"socket path {path} takes {size} bytes with its terminating NUL, over the {limit}-byte limit of "
            f"{system} (sun_path); choose a shorter daemon.run_dir")
