"""Memory faults reproduced with real MLX arrays, for exercising the supervisor.

A leak keeps every step's gradient dict plus a filler array alive (the pattern of the loop that started this
project); a peak holds a transient working set proportional to the batch for the duration of one step.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

_MB = 1024 * 1024


class Leak:
    """Retains ``mb_per_step`` MiB of real, touched MLX memory per step, for the life of the process."""

    def __init__(self, mb_per_step: float) -> None:
        self.mb_per_step = mb_per_step
        self.retained: list[tuple[Any, mx.array]] = []

    def step(self, step: int, grads: Any) -> None:
        if self.mb_per_step <= 0:
            return
        floats = max(1, int(self.mb_per_step * _MB) // 4)
        filler = mx.full((floats,), float(step), dtype=mx.float32)  # written, so resident, not lazily zero
        mx.eval(filler)
        self.retained.append((grads, filler))


def transient_peak(mb_per_sample: float, batch: int) -> mx.array | None:
    """A working set of ``mb_per_sample * batch`` MiB, materialised now; the caller drops it after the step."""
    if mb_per_sample <= 0:
        return None
    floats = max(1, int(mb_per_sample * batch * _MB) // 4)
    peak = mx.full((floats,), 1.0, dtype=mx.float32)
    mx.eval(peak)
    return peak


def use_peak(peak: mx.array | None) -> None:
    """Read the working set once more at the end of the step, as a real activation would be, so the peak
    spans the whole step rather than an instant; the result does not touch the model."""
    if peak is not None:
        mx.eval(mx.sum(peak))
