"""Loading one checkpoint file (safetensors) with its checksum, reading it from disk once.

A thread reads the file front to back in large chunks and checksums it (``protocol.checkpoints.file_sums``);
meanwhile MLX copies each tensor from the page cache into its array as soon as the reader has passed the
tensor's end, so reading, checksumming and copying overlap. The arrays are returned only once the checksum
matched. Evaluating before the checksum is known is safe because the header is checked first: a safetensors file
is an 8-byte length, a JSON header, and the tensors' bytes back to back, so when the header's tensors fill the
rest of the file exactly (and MLX sizes each array as the header does), nothing can allocate more than the file
holds. A file laid out any other way is checksummed first and loaded after, as a damaged header may claim
anything.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.checkpoints import Background, CheckpointDamaged, Sums, check_sums, file_sums

if TYPE_CHECKING:
    import mlx.core as mx

MAX_HEADER = 100 << 20  # bytes of JSON header we are willing to parse


def load_file(path: Path, expected: dict[str, Any]) -> dict[str, mx.array]:
    """The evaluated arrays of one safetensors file whose size and checksum (CRC-32 when ``expected`` has one,
    else SHA-256) match ``expected``; CheckpointDamaged naming the file and the problem otherwise."""
    try:
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointDamaged(f"{path.name}: {size} bytes, expected {expected['bytes']}")
        ends = _tensor_ends(path, size)
    except OSError as exc:
        raise CheckpointDamaged(f"{path.name}: {exc.strerror or exc}") from exc
    progress = _Progress()
    summing = Background(_checksums_reporting, path, expected, progress)
    loaded: dict[str, mx.array] | None = None
    try:
        loaded = _lazy_load(path)
        if ends is not None and _sized_as_the_header(loaded, ends):
            _evaluate_behind(loaded, ends, progress)
    finally:
        sums = _result(path, summing)
    check_sums(path.name, sums, expected)
    if loaded is None:  # pragma: no cover - _lazy_load raised, and that left the finally above
        raise CheckpointDamaged(f"{path.name}: not loaded")
    _evaluate(path, loaded, list(loaded))  # what was not read behind the reader (another layout): after the check
    return loaded


def _tensor_ends(path: Path, size: int) -> dict[str, tuple[int, int]] | None:
    """{tensor: (bytes, end offset in the file)} in file order, when the tensors fill the file exactly; else None."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 <= length <= min(MAX_HEADER, size - 8):
            return None
        header = fh.read(length)
    try:
        entries = json.loads(header)
        spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), str(k))
                       for k, v in entries.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    base, position, ends = 8 + length, 0, {}
    for begin, end, name in spans:
        if begin != position or end < begin:
            return None
        ends[name], position = (end - begin, base + end), end
    return ends if base + position == size else None


def _sized_as_the_header(loaded: dict[str, mx.array], ends: dict[str, tuple[int, int]]) -> bool:
    return set(loaded) == set(ends) and all(loaded[name].nbytes == nbytes for name, (nbytes, _) in ends.items())


class _Progress:
    """How far the reader has got; the loader waits on it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._read = 0
        self._stopped = False

    def advance(self, read: int) -> None:
        with self._changed:
            self._read = read
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def reached(self, offset: int) -> bool:
        """Wait until ``offset`` bytes were read; False when the reader stopped short of it."""
        with self._changed:
            self._changed.wait_for(lambda: self._read >= offset or self._stopped)
            return self._read >= offset


def _checksums_reporting(path: Path, expected: dict[str, Any], progress: _Progress) -> Sums:
    try:
        return file_sums(path, expected, progress.advance)
    finally:
        progress.stop()


def _result(path: Path, summing: Background) -> Sums:
    try:
        sums: Sums = summing.result()
    except OSError as exc:
        raise CheckpointDamaged(f"{path.name}: {exc.strerror or exc}") from exc
    return sums


def _lazy_load(path: Path) -> dict[str, mx.array]:
    import mlx.core as mx  # lazily: the daemon imports the checkpoint module without mlx

    try:
        loaded = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointDamaged(f"{path.name}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise CheckpointDamaged(f"{path.name}: not a safetensors file")
    return loaded


def _evaluate_behind(loaded: dict[str, mx.array], ends: dict[str, tuple[int, int]], progress: _Progress) -> None:
    """Copy each tensor into its array once the reader has passed it (its pages are then in the page cache)."""
    import mlx.core as mx

    for name, (_, end) in ends.items():
        if not progress.reached(end):
            return  # the reader stopped early: its error (or the checksum) says why
        try:
            mx.eval(loaded[name])
        except (RuntimeError, ValueError, OSError):
            return  # reported by the checksum, or again by the final evaluation


def _evaluate(path: Path, loaded: dict[str, mx.array], names: list[str]) -> None:
    import mlx.core as mx

    try:
        mx.eval([loaded[name] for name in names])  # read now: the caller may delete the files afterwards
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointDamaged(f"{path.name}: {exc}") from exc
