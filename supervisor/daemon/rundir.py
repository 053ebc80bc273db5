"""The daemon's private run directory: created 0700, refused when others could write to it, locked; and the one
place an ipc endpoint inside it is made, checked against the socket path limit before anything binds it."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import IO

from supervisor.paths import IPC_SOCKETS, socket_path_problem


class RunDirError(RuntimeError):
    """The run directory is unsafe or unusable; the message names it."""


def prepare_run_dir(path: Path) -> Path:
    """Create the private run dir (0700); refuse one that others could write to, or whose sockets' paths would
    be too long to bind."""
    for name in IPC_SOCKETS:
        ipc_socket(path, name)
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


def ipc_socket(run_dir: Path, name: str) -> Path:
    """The path of socket ``name`` (one of ``IPC_SOCKETS``) in ``run_dir``; RunDirError naming the path and the
    limit when it is too long to bind (ZeroMQ would only fail later, with a vaguer error)."""
    if name not in IPC_SOCKETS:
        raise ValueError(f"{name!r} is not a known ipc socket; add it to supervisor.paths.IPC_SOCKETS")
    path = run_dir / name
    if problem := socket_path_problem(path):
        raise RunDirError(problem)
    return path
