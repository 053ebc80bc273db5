"""The checkpoint directory format every SDK writes (docs/PROTOCOL.md, "Checkpoints"); no MLX, no numpy.

A job's checkpoint directory holds one ``ckpt-{step:010d}/`` directory per checkpoint: whatever files the SDK
stores (any names, any format) plus ``meta.json``, written last, with ``format``, ``step``, ``created`` and the
size and SHA-256 of every other file. Scratch directories (``.tmp-ckpt-*`` being written, ``.trash-ckpt-*`` a
replaced copy, ``.prune-ckpt-*`` being deleted) never count as checkpoints. The daemon only reads names
(``list_checkpoints``, ``latest_step``); ``verify`` checks a checkpoint's files against its ``meta.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Final

FORMAT: Final = 1
META_FILE: Final = "meta.json"
RESERVED_META: Final = ("step", "created", "format", "files")  # written by the format, not by the trainer
NAME: Final = re.compile(r"ckpt-(\d{10,})")
# .tmp: a checkpoint being written; .trash: the previous copy of a step being replaced (restorable);
# .prune: an old checkpoint being deleted (renamed first so a half-deleted one never looks complete).
SCRATCH: Final = re.compile(r"\.(tmp|trash|prune)-ckpt-(\d+)-(\d+)-[0-9a-f]+")
_CHUNK: Final = 1 << 20
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


class CheckpointDamaged(Exception):
    """A checkpoint directory does not verify; the message names the file and the problem."""


def checkpoint_name(step: int) -> str:
    """Directory name of checkpoint ``step``."""
    return f"ckpt-{step:010d}"


def step_of(path: Path) -> int:
    """The step encoded in a ``ckpt-{step:010d}`` directory name."""
    return int(path.name.removeprefix("ckpt-"))


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories in ``directory``, oldest first by step; by name only, nothing is verified.

    A missing directory has none; one that cannot be read raises OSError.
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), Path(e.path)) for e in entries
             if (m := NAME.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)]
    return [path for _, path in sorted(found)]


def latest_step(directory: Path) -> int | None:
    """Step of the newest checkpoint by name (cheap, unverified); None when there is none."""
    paths = list_checkpoints(directory)
    return step_of(paths[-1]) if paths else None


def full_fsync(fd: int) -> None:
    """Make what was written to ``fd`` (a file, or a directory's entries) survive a power loss.

    On macOS ``fsync`` only hands the data to the drive, whose cache may still lose it (xnu fsync(2)); only
    ``fcntl(F_FULLFSYNC)`` asks the drive to flush. Where that fcntl does not exist or fails (a file system that
    does not support it), ``fsync`` is what there is.
    """
    command = getattr(fcntl, "F_FULLFSYNC", None)
    if command is not None:
        try:
            fcntl.fcntl(fd, command)
            return
        except OSError:
            pass
    os.fsync(fd)


def hash_file(path: Path, *, sync: bool) -> tuple[str, int]:
    """SHA-256 and size of a file, read in 1 MiB chunks; with ``sync`` also make it durable (``full_fsync``)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        if sync:
            full_fsync(fh.fileno())
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def read_meta(path: Path) -> dict[str, Any]:
    """Parse ``meta.json`` of checkpoint ``path`` and check the fields verification relies on."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointDamaged(f"{META_FILE}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointDamaged(f"{META_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointDamaged(f"{META_FILE}: not a format-{FORMAT} checkpoint record")
    if meta.get("step") != step_of(path):
        raise CheckpointDamaged(f"{META_FILE}: step {meta.get('step')!r} does not match the directory name")
    files = meta.get("files")
    if not isinstance(files, dict) or not files or not all(
        _safe_name(name) and isinstance(f, dict) and isinstance(f.get("sha256"), str)
        and _SHA256.fullmatch(f["sha256"]) and isinstance(f.get("bytes"), int) and not isinstance(f["bytes"], bool)
        for name, f in files.items()
    ):
        raise CheckpointDamaged(f"{META_FILE}: missing or malformed 'files' checksums")
    return meta


def verify(path: Path) -> dict[str, Any]:
    """Check every file ``meta.json`` lists (size, then SHA-256) and return the record; CheckpointDamaged if not."""
    meta = read_meta(path)
    for name, expected in meta["files"].items():
        try:
            digest, size = hash_file(path / name, sync=False)
        except OSError as exc:
            raise CheckpointDamaged(f"{name}: {exc.strerror or exc}") from exc
        if size != expected["bytes"]:
            raise CheckpointDamaged(f"{name}: {size} bytes, expected {expected['bytes']}")
        if digest != expected["sha256"]:
            raise CheckpointDamaged(f"{name}: sha256 mismatch")
    return meta


def unlisted_files(path: Path, meta: dict[str, Any]) -> list[str]:
    """Files under checkpoint ``path`` that ``meta.json`` does not list (the format requires none)."""
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    return [name for name in found if name != META_FILE and name not in meta["files"]]


def _safe_name(name: object) -> bool:
    """A relative path inside the checkpoint: '/'-separated, no empty, '.' or '..' parts, not meta.json."""
    if not isinstance(name, str) or not name or name == META_FILE or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
