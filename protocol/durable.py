"""Durable writes, shared by the worker's checkpoints and the daemon's own files (run summary, a gang's ring file).

A write is durable when it survives a power loss: the data flushed past the drive's cache, and the directory entry
that names it flushed too. On macOS ``fsync`` only hands the data to the drive (xnu ``bsd/man/man2/fsync.2``): only
``fcntl(F_FULLFSYNC)`` asks the drive to flush its cache, so that is tried first everywhere it exists, and plain
``fsync`` is the fallback where it does not exist or fails (a file system without it). Standard library only: the
worker may import it (it imports protocol/ only, tests/test_layout.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["fsync_dir", "full_fsync", "write_durably"]


def full_fsync(fd: int) -> None:
    """Make what was written to ``fd`` (a file, or a directory's entries) survive a power loss.

    ``fcntl(fd, F_FULLFSYNC)`` where the platform has it (macOS), else, or when it fails, ``fsync``.
    """
    command = getattr(fcntl, "F_FULLFSYNC", None)
    if command is not None:
        try:
            fcntl.fcntl(fd, command)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """Sync a directory so renames and new entries inside it survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        full_fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: write a temporary file beside it, sync it, rename it
    over ``path``, sync the directory. A crash at any moment leaves the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            full_fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
