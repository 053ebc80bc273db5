"""Platform default locations for config, state, logs and the private run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

APP = "mlx-supervisor"


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_config_path() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Application Support" / APP / "mlxsup.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or str(_home() / ".config")
    return Path(base) / APP / "mlxsup.toml"


def default_state_dir() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Application Support" / APP
    base = os.environ.get("XDG_STATE_HOME") or str(_home() / ".local" / "state")
    return Path(base) / APP


def default_log_dir() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Logs" / APP
    return default_state_dir() / "logs"


def default_run_dir() -> Path:
    # ipc socket paths are limited to ~100 bytes, so the run dir must stay short.
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and sys.platform != "darwin":
        return Path(runtime) / "mlxsup"
    return Path("/tmp") / f"mlxsup-{os.getuid()}"
