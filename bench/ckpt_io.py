"""Checkpoint throughput: ``save_checkpoint``/``load_latest`` against raw sequential ``dd`` of the same size.

Arrays are random float32 MLX arrays totalling ``size_mb`` MiB (ten equal tensors in the model file, an empty
optimizer file). Ours: write + fsync + SHA-256 of each file + meta.json + rename + directory fsyncs; load:
verify every checksum, then ``mx.load`` and evaluate. Raw: ``dd if=/dev/zero bs=1M conv=fsync`` and
``dd of=/dev/null bs=1M``. Save and dd-write rounds alternate in order (ours first, then dd first, ...), as
do load and dd-read. Reads are cold when ``/proc/sys/vm/drop_caches`` is writable (we drop the page cache
before each read), else both are warm-cache reads and the result says so.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BenchError, MiB, median, rounded, run_child

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """sync, then drop the page cache; False when this sandbox does not allow it."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def _arrays(size_mb: int) -> dict[str, Any]:
    import mlx.core as mx

    count = 10
    floats = size_mb * MiB // 4 // count
    arrays = {f"layer{i}.weight": mx.random.normal((floats,), key=mx.random.key(i)) for i in range(count)}
    mx.eval(list(arrays.values()))
    return arrays


def _timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _dd(argv: list[str], timeout: float) -> None:
    if run_child(["dd", *argv, "status=none"], timeout) != 0:
        raise BenchError(f"dd {' '.join(argv)} failed")


def _one_round(work: Path, arrays: dict[str, Any], size_mb: int, ours_first: bool, cold: bool) -> dict[str, float]:
    from worker.checkpoint import load_latest, save_checkpoint

    ckpt_dir, raw = work / "ckpt", work / "raw.bin"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    raw.unlink(missing_ok=True)
    times: dict[str, float] = {}

    def ours_save() -> None:
        times["save"] = _timed(lambda: save_checkpoint(ckpt_dir, 1, arrays, {}, {}, keep=1))

    def raw_write() -> None:
        times["write"] = _timed(lambda: _dd(["if=/dev/zero", f"of={raw}", "bs=1M", f"count={size_mb}",
                                             "conv=fsync"], 120))

    def ours_load() -> None:
        if cold:
            drop_caches()
        times["load"] = _timed(lambda: _check_loaded(load_latest(ckpt_dir)))

    def raw_read() -> None:
        if cold:
            drop_caches()
        times["read"] = _timed(lambda: _dd([f"if={raw}", "of=/dev/null", "bs=1M"], 120))

    for action in ((ours_save, raw_write) if ours_first else (raw_write, ours_save)):
        action()
    for action in ((ours_load, raw_read) if ours_first else (raw_read, ours_load)):
        action()
    return times


def _check_loaded(loaded: object) -> None:
    if loaded is None:
        raise BenchError("load_latest found no checkpoint it could verify")


def measure(work: Path, size_mb: int, rounds: int) -> dict[str, Any]:
    """``rounds`` alternating rounds; MB/s of each and median ratios ours ÷ raw."""
    work.mkdir(parents=True, exist_ok=True)
    if shutil.which("dd") is None:
        raise BenchError("dd is not installed")
    cold = drop_caches()
    arrays = _arrays(size_mb)
    nbytes = size_mb * MiB
    rows = [_one_round(work, arrays, size_mb, index % 2 == 0, cold) for index in range(rounds)]
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    (work / "raw.bin").unlink(missing_ok=True)

    def rate(key: str) -> list[float]:
        return [nbytes / 1e6 / row[key] for row in rows]

    return {
        "checkpoint_save_ratio": rounded(median([s / w for s, w in zip(rate("save"), rate("write"), strict=True)])),
        "checkpoint_load_ratio": rounded(median([a / b for a, b in zip(rate("load"), rate("read"), strict=True)])),
        "save_mb_per_s": rounded(median(rate("save")), 1), "dd_write_mb_per_s": rounded(median(rate("write")), 1),
        "load_mb_per_s": rounded(median(rate("load")), 1), "dd_read_mb_per_s": rounded(median(rate("read")), 1),
        "rounds": [{k: round(v, 4) for k, v in row.items()} for row in rows],
        "size_mb": size_mb, "cold_reads": cold,
        "note": ("cold reads (page cache dropped before each read)" if cold else
                 "page cache could not be dropped: both reads are warm-cache reads"),
    }
