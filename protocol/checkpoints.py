"""The checkpoint directory format every SDK writes (docs/PROTOCOL.md, "Checkpoints"); no MLX, no numpy.

A job's checkpoint directory holds one ``ckpt-{step:010d}/`` directory per checkpoint: whatever files the SDK
stores (any names, any format) plus ``meta.json``, written last, with ``format``, ``step``, ``created`` and the
size and SHA-256 of every other file (and optionally its CRC-32, which verification then checks instead: it
catches truncation and bit flips as surely, at twice the speed). Scratch directories (``.tmp-ckpt-*`` being
written, ``.trash-ckpt-*`` a replaced copy, ``.prune-ckpt-*`` being deleted) never count as checkpoints. The
daemon only reads names (``list_checkpoints``, ``latest_step``); ``verify`` checks a checkpoint's files against
its ``meta.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from protocol.durable import full_fsync

FORMAT: Final = 1
META_FILE: Final = "meta.json"
RESERVED_META: Final = ("step", "created", "format", "files")  # written by the format, not by the trainer
NAME: Final = re.compile(r"ckpt-(\d{10,})")
# .tmp: a checkpoint being written; .trash: the previous copy of a step being replaced (restorable);
# .prune: an old checkpoint being deleted (renamed first so a half-deleted one never looks complete).
SCRATCH: Final = re.compile(r"\.(tmp|trash|prune)-ckpt-(\d+)-(\d+)-[0-9a-f]+")
_CHUNK: Final = 4 << 20  # large sequential reads: the kernel's read-ahead keeps the disk busy
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


@dataclasses.dataclass(frozen=True)
class Sums:
    """A file's size and the checksums that were asked for (None: not computed)."""

    size: int
    sha256: str | None
    crc32: int | None


def checksums(path: Path, *, sync: bool = False, sha256: bool = True, crc32: bool = False,
              progress: Callable[[int], object] | None = None) -> Sums:
    """Size and the chosen checksums of a file; with ``sync`` it is also made durable (``full_fsync``).

    The file is read once, sequentially, in large chunks, while a thread per checksum works on the chunks already
    read (hashlib and zlib release the GIL), and the sync runs in a thread of its own: the time is about the
    longest of these rather than their sum. ``progress(n)`` is told after each chunk how many bytes were read.
    """
    digest, crc = hashlib.sha256(), [0]
    consumers: list[Callable[[bytes], object]] = []
    if sha256:
        consumers.append(digest.update)
    if crc32:
        consumers.append(lambda chunk: crc.__setitem__(0, zlib.crc32(chunk, crc[0])))
    queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=4) for _ in consumers]  # bounds the memory
    threads = [threading.Thread(target=_consume, args=(q, fn), name="checkpoint-sum", daemon=True)
               for q, fn in zip(queues, consumers, strict=True)]
    for thread in threads:
        thread.start()
    size = 0
    try:
        with open(path, "rb", buffering=0) as fh:
            syncing = Background(full_fsync, fh.fileno()) if sync else None
            try:
                while chunk := fh.read(_CHUNK):
                    for q in queues:
                        q.put(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(size)
            finally:
                if syncing is not None:
                    syncing.result()  # raises what the sync raised (a full disk, an I/O error)
    finally:
        for q, thread in zip(queues, threads, strict=True):
            q.put(None)
            thread.join()
    return Sums(size, digest.hexdigest() if sha256 else None, crc[0] if crc32 else None)


def _consume(chunks: queue.Queue[bytes | None], checksum: Callable[[bytes], object]) -> None:
    while (chunk := chunks.get()) is not None:
        checksum(chunk)


class Background:
    """``function(*args, **kwargs)`` in a thread; ``result()`` waits for it and returns what it returned, or raises
    what it raised."""

    def __init__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), name="checkpoint-io",
                                        daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            self._value = function(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def hash_file(path: Path, *, sync: bool) -> tuple[str, int]:
    """SHA-256 and size of a file; with ``sync`` also make it durable (``full_fsync``)."""
    sums = checksums(path, sync=sync)
    assert sums.sha256 is not None
    return sums.sha256, sums.size


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
        and (f.get("crc32") is None or _is_crc32(f["crc32"]))
        for name, f in files.items()
    ):
        raise CheckpointDamaged(f"{META_FILE}: missing or malformed 'files' checksums")
    return meta


def verify(path: Path) -> dict[str, Any]:
    """Check every file ``meta.json`` lists (size, then the CRC-32 when it was stored, else the SHA-256) and
    return the record; CheckpointDamaged if not. Each file is read from disk once (``checksums``)."""
    meta = read_meta(path)
    for name, expected in meta["files"].items():
        try:
            sums = file_sums(path / name, expected)
        except OSError as exc:
            raise CheckpointDamaged(f"{name}: {exc.strerror or exc}") from exc
        check_sums(name, sums, expected)
    return meta


def file_sums(path: Path, expected: dict[str, Any], progress: Callable[[int], object] | None = None) -> Sums:
    """Size and the checksum that ``meta.json``'s entry ``expected`` is verified by (``checksums``): the CRC-32
    when the entry has one, else the SHA-256."""
    fast = expected.get("crc32") is not None
    return checksums(path, sha256=not fast, crc32=fast, progress=progress)


def check_sums(name: str, sums: Sums, expected: dict[str, Any]) -> None:
    """CheckpointDamaged naming file ``name`` unless ``sums`` (from ``file_sums``) match its entry ``expected``."""
    if sums.size != expected["bytes"]:
        raise CheckpointDamaged(f"{name}: {sums.size} bytes, expected {expected['bytes']}")
    if expected.get("crc32") is not None:
        if sums.crc32 != expected["crc32"]:
            raise CheckpointDamaged(f"{name}: crc32 mismatch")
    elif sums.sha256 != expected["sha256"]:
        raise CheckpointDamaged(f"{name}: sha256 mismatch")


def _is_crc32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def unlisted_files(path: Path, meta: dict[str, Any]) -> list[str]:
    """Files under checkpoint ``path`` that ``meta.json`` does not list (the format requires none)."""
    found = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    return [name for name in found if name != META_FILE and name not in meta["files"]]


def _safe_name(name: object) -> bool:
    """A relative path inside the checkpoint: '/'-separated, no empty, '.' or '..' parts, not meta.json."""
    if not isinstance(name, str) or not name or name == META_FILE or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
