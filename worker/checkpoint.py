"""Durable, verified checkpoint I/O for MLX training.

The format is ``protocol.checkpoints`` (any SDK may store any files); the Python SDK stores
``model.safetensors`` and ``optimizer.safetensors`` beside ``meta.json`` (written last, with the size and
SHA-256 of every other file). A checkpoint is built in a ``.tmp-ckpt-*`` directory, synced (``F_FULLFSYNC`` on
macOS), and renamed into place, so a crash at any moment leaves either the old set of checkpoints or the new one,
never a half-written ``ckpt-*``. Loading verifies every checksum and falls back to older checkpoints.

Names (``list_checkpoints``, ``latest_step``) come from ``protocol.checkpoints``, which the daemon reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.checkpoints import (
    FORMAT,
    META_FILE,
    RESERVED_META,
    SCRATCH,
    CheckpointDamaged,
    checkpoint_name,
    checksums,
    latest_step,
    list_checkpoints,
    read_meta,
    step_of,
)
from protocol.durable import fsync_dir, full_fsync
from worker.safetensors_load import load_file

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = ["FORMAT", "META_FILE", "Checkpoint", "CheckpointError", "full_fsync", "latest_step", "list_checkpoints",
           "load_latest", "save_checkpoint"]
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# Scratch directories this process is writing right now; anything else with our pid is left over from a
# previous process that had the same pid (pids are reused, e.g. in a fresh container).
_IN_FLIGHT: set[str] = set()

LogFn = Callable[[str, dict[str, Any]], None]


class CheckpointError(Exception):
    """A checkpoint could not be written or none could be loaded; message names the path and problem."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint whose arrays are already evaluated, so its files may be deleted afterwards."""

    path: Path
    step: int
    meta: dict[str, Any]
    model: dict[str, mx.array]
    optimizer: dict[str, mx.array]


def save_checkpoint(directory: Path, step: int, model: dict[str, mx.array], optimizer: dict[str, mx.array],
                    meta: dict[str, Any], keep: int = 3) -> Path:
    """Durably write checkpoint ``step`` into ``directory``, keep the newest ``keep``, and return its path.

    Raises CheckpointError (naming the path and the OS error) when it cannot be written; the temp directory is
    then removed and earlier checkpoints are untouched. Saving an existing step replaces it atomically.
    """
    if keep < 1 or step < 0:
        raise ValueError(f"keep must be >= 1 and step >= 0 (got keep={keep}, step={step})")
    if clash := [key for key in RESERVED_META if key in meta]:
        raise ValueError(f"meta keys {clash} are reserved by the checkpoint format")
    json.dumps(meta)  # fail with TypeError before touching the disk if meta is not JSON
    directory = Path(directory)
    tmp = directory / f".tmp-ckpt-{step}-{os.getpid()}-{secrets.token_hex(4)}"
    final = directory / checkpoint_name(step)
    _IN_FLIGHT.add(tmp.name)
    try:
        _ensure_dir(directory)
        _clean_scratch(directory)
        tmp.mkdir()
        _write_contents(tmp, step, model, optimizer, meta)
        _install(tmp, final)
    except (OSError, RuntimeError) as exc:  # mlx reports write failures (e.g. a full disk) as RuntimeError
        _remove(tmp)
        raise CheckpointError(f"cannot write checkpoint {final}: {exc}") from exc
    except BaseException:  # e.g. a non-array value or KeyboardInterrupt: still leave no temp dir behind
        _remove(tmp)
        raise
    finally:
        _IN_FLIGHT.discard(tmp.name)
    _prune(directory, final, keep)
    return final


def load_latest(directory: Path, log: LogFn | None = None, at_most: int | None = None) -> Checkpoint | None:
    """Load the newest checkpoint that verifies, falling back past damaged ones; None when none verifies.
    With ``at_most``, checkpoints of later steps are passed over (a gang agreeing on a common step).

    Each damaged checkpoint is reported as ``log("checkpoint_damaged", {"path": ..., "problem": ...})`` and
    left on disk for the operator.
    """
    directory = Path(directory)
    if directory.is_dir():
        _clean_scratch(directory)
    for path in reversed(list_checkpoints(directory)):
        if at_most is not None and step_of(path) > at_most:
            continue
        try:
            return _load_verified(path)
        except CheckpointDamaged as exc:
            if log is not None:
                log("checkpoint_damaged", {"path": str(path), "problem": str(exc)})
    return None


def _write_contents(tmp: Path, step: int, model: dict[str, mx.array], optimizer: dict[str, mx.array],
                    meta: dict[str, Any]) -> None:
    """Write both array files, then meta.json with their checksums, fsyncing each and finally ``tmp``."""
    import mlx.core as mx  # lazily: the daemon imports this module without mlx

    files: dict[str, dict[str, Any]] = {}
    for name, arrays in ((MODEL_FILE, model), (OPTIMIZER_FILE, optimizer)):
        path = tmp / name
        mx.save_safetensors(str(path), arrays)  # an empty dict gives a valid, tensor-less file
        sums = checksums(path, sync=True, sha256=True, crc32=True)  # one read of the file for both
        files[name] = {"sha256": sums.sha256, "crc32": sums.crc32, "bytes": sums.size}
    record = {**meta, "step": step, "created": time.time(), "format": FORMAT, "files": files}
    with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
        fh.flush()
        full_fsync(fh.fileno())
    fsync_dir(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``, first moving an existing ``final`` aside (rename cannot replace a dir)."""
    trash: Path | None = None
    if os.path.lexists(final):
        trash = final.parent / f".trash-ckpt-{step_of(final)}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except OSError:
        if trash is not None:
            os.rename(trash, final)  # put the previous copy back; tmp is removed by the caller
        raise
    fsync_dir(final.parent)
    if trash is not None:
        _remove(trash)


def _prune(directory: Path, saved: Path, keep: int) -> None:
    """Delete all but the newest ``keep - 1`` checkpoints older than ``saved``. Newer ones (which can only be
    damaged ones the load passed over) are neither counted nor touched: they stay for the operator.

    Best effort: the new checkpoint is already durable, and whatever is left is retried on the next save.
    """
    others = [path for path in list_checkpoints(directory) if step_of(path) < step_of(saved)]
    for path in others[: max(0, len(others) - (keep - 1))]:
        doomed = directory / f".prune-ckpt-{step_of(path)}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(path, doomed)
        except OSError:
            continue
        _remove(doomed)


def _load_verified(path: Path) -> Checkpoint:
    """Verify meta.json and every checksum of one checkpoint while loading and evaluating its arrays (each file
    is read from disk once: ``worker.safetensors_load``)."""
    meta = read_meta(path)
    if set(meta["files"]) != {MODEL_FILE, OPTIMIZER_FILE}:
        raise CheckpointDamaged(f"{META_FILE}: lists {sorted(meta['files'])}, expected the Python SDK's "
                                f"{MODEL_FILE} and {OPTIMIZER_FILE}")
    model, optimizer = (load_file(path / name, meta["files"][name]) for name in (MODEL_FILE, OPTIMIZER_FILE))
    return Checkpoint(path=path, step=meta["step"], meta=meta, model=model, optimizer=optimizer)


def _clean_scratch(directory: Path) -> None:
    """Remove scratch dirs left by dead writers; restore a replaced step whose new copy never landed."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # nothing to clean; a save reports the real problem when it tries to write
    for entry in entries:
        match = SCRATCH.fullmatch(entry.name)
        if match is None or entry.name in _IN_FLIGHT or _alive(int(match.group(3))):
            continue
        kind, step = match.group(1), int(match.group(2))
        final = directory / checkpoint_name(step)
        if kind == "trash" and not os.path.lexists(final):
            # The writer died between moving the old copy aside and renaming the new one in: the old copy
            # is a complete checkpoint, so put it back rather than lose the step.
            try:
                os.rename(entry.path, final)
                continue
            except OSError:
                pass
        _remove(Path(entry.path))


def _alive(pid: int) -> bool:
    """Whether another live process has this pid (our own pid counts as dead: see _IN_FLIGHT)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ensure_dir(directory: Path) -> None:
    """Create ``directory`` if needed, making its new entry durable too."""
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)


def _remove(path: Path) -> None:
    """Delete a file or directory tree, ignoring errors (used only for scratch and pruned entries)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    with contextlib.suppress(OSError):  # e.g. the parent is not a directory: nothing of ours to remove
        path.unlink(missing_ok=True)
