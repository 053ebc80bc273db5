"""The daemon's private run directory: created 0700, refused when others could write to it, locked."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import IO


class RunDirError(RuntimeError):
    """The run directory is unsafe or unusable; the message names it."""


def prepare_run_dir(path: Path) -> Path:
    """Create the private run dir (0700); refuse one that others could write to."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"run dir {path} is not a directory (a symlink is not followed)")
    if info.st_uid != os.getuid():
        raise RunDirError(f"run dir {path} belongs to uid {info.st_uid}, not to us ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RunDirError(f"run dir {path} is writable by group or others (mode {oct(info.st_mode & 0o777)})")
    os.chmod(path, 0o700)
    return path


def lock_run_dir(run_dir: Path) -> IO[str]:
    """One daemon per run dir: a second one would steal the first one's sockets."""
    handle = open(run_dir / "mlxsupd.lock", "w")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(f"another mlxsupd is already running with run dir {run_dir}") from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle
