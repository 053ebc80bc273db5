"""Leak forensics of a worker life: which memory grows, what that means, and what fixes it.

Beside the decision, never part of it: the policy decides on the footprint alone (``policy.Estimator``); this
module explains. Per life it keeps a robust slope per step (``trend.ThinnedTrend``) of four series the worker
reports with every step: its footprint, MLX's active memory, MLX's cache, and what is outside MLX (footprint -
active - cache). A guard-only job reports nothing, so its footprint samples give a slope per second instead.
An MLX counter the worker did not measure (``None``) is never taken for a zero: the series it feeds stays
empty, and the verdict says what it cannot tell. Pure: numbers and ``now`` in, no I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from supervisor.core.sizes import format_bytes
from supervisor.core.trend import Fit, ThinnedTrend

SERIES = ("footprint", "active", "cache", "outside")
PARTS = {"active": "arrays_retained", "cache": "cache_growth", "outside": "outside_mlx"}
DOMINANT = 0.75  # a part with this share of the growth names the verdict; otherwise it is mixed
SIGNIFICANT = 0.25  # a part grows when its slope is over this fraction of the leak threshold

MEANINGS = {
    "arrays_retained": "MLX active memory grows {rate}: arrays that are still referenced, such as a list of "
                       "losses or gradients, a dict keyed by step, or an attribute that accumulates. Clearing the "
                       "cache cannot free them.",
    "cache_growth": "MLX's buffer cache grows {rate}: freed buffers are kept for reuse instead of being returned "
                    "(varying shapes make it worse). Clearing the cache or limiting it frees this memory.",
    "outside_mlx": "memory outside MLX grows {rate} while MLX's counters do not: Python objects, numpy arrays, "
                   "tokenizer or dataset caches, or native allocations in a Rust or C++ worker.",
    "mixed": "several kinds of memory grow ({parts}): no single cause.",
    "none": "no growth over the leak threshold ({threshold}/step): the footprint moves {rate}.",
    "unattributed": "the footprint grows {rate}, but the worker does not report MLX's memory, so the growth "
                    "cannot be split between arrays, the cache and the rest.",
    "too_few": "too few measurements yet to tell (at least 4 after the warm-up are needed).",
}
FIXES = {
    "arrays_retained": (
        "keep Python numbers (loss.item()) rather than arrays in logs and histories",
        "drop or bound references to per-step arrays: lists, dicts keyed by step, attributes of objects",
        "run `mlxsupctl diagnose JOB` (Python SDK) to name the object that holds them",
    ),
    "cache_growth": (
        "set the job's `cache_limit` (e.g. \"10%\" of the budget) or `cache_clear` (bytes)",
        "or call mx.set_cache_limit(bytes) in the training script",
        "pad or bucket varying sequence lengths so buffers are reused",
    ),
    "outside_mlx": (
        "look for Python containers that grow every step (`mlxsupctl diagnose JOB` counts their items)",
        "bound tokenizer, dataset and numpy caches",
        "in a Rust or C++ worker, look for native allocations kept across steps",
    ),
    "unattributed": ("report MLX's active and cache memory with each step (end_step_with in the Rust SDK)",),
}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What grows, in words, with its fixes and the numbers behind it."""

    verdict: str
    meaning: str
    fixes: tuple[str, ...]
    slopes: dict[str, float | None]  # per step (or per second for a guard-only life); None: not measured
    interval: dict[str, list[float] | None]  # 95% interval of each slope
    per: str = "step"

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "meaning": self.meaning, "fixes": list(self.fixes), "per": self.per,
                "slopes": self.slopes, "interval": self.interval}


def rate(value: float, per: str) -> str:
    return f"{format_bytes(round(value))}/{per}"


def judge(fits: dict[str, Fit | None], threshold: float, per: str = "step") -> Verdict:
    """The verdict on one set of fits (bytes per ``per``), against the leak threshold (bytes per ``per``)."""
    slopes = {name: (round(fit.slope, 1) if fit else None) for name, fit in fits.items()}
    interval = {name: ([round(fit.low, 1), round(fit.high, 1)] if fit else None) for name, fit in fits.items()}
    footprint = fits.get("footprint")

    def verdict(name: str, **words: Any) -> Verdict:
        return Verdict(name, MEANINGS[name].format(**words), FIXES.get(name, ()), slopes, interval, per)

    if footprint is None:  # too few points yet: nothing to tell, which is no leak verdict
        return Verdict("none", MEANINGS["too_few"], (), slopes, interval, per)
    measured = {name: fit.slope for name in PARTS if (fit := fits.get(name)) is not None}
    growth = max([footprint.slope, *measured.values()])
    if growth <= threshold:
        return verdict("none", threshold=format_bytes(round(threshold)), rate=rate(footprint.slope, per))
    if "active" not in measured and "cache" not in measured:
        return verdict("unattributed", rate=rate(footprint.slope, per))
    growing = {name: slope for name, slope in measured.items() if slope > SIGNIFICANT * threshold}
    total = sum(growing.values())
    for name, slope in growing.items():
        if slope >= DOMINANT * total:
            return verdict(PARTS[name], rate=rate(slope, per))
    parts = ", ".join(f"{PARTS[name]} {rate(slope, per)}" for name, slope in
                      sorted(growing.items(), key=lambda item: -item[1]))
    fixes = tuple(fix for name in sorted(growing, key=lambda n: -growing[n]) for fix in FIXES[PARTS[name]][:2])
    return Verdict("mixed", MEANINGS["mixed"].format(parts=parts or rate(footprint.slope, per)), fixes, slopes,
                   interval, per)


class LifeForensics:
    """The four series of one worker life (its lead rank), per step, or its footprint per second."""

    def __init__(self, life: int, started: float, threshold: float, warmup: int = 3) -> None:
        self.life = life
        self.started = started
        self.threshold = threshold
        self.warmup = warmup
        self.steps_seen = 0
        self.first_step: int | None = None
        self.last_step = 0
        self.series = {name: ThinnedTrend(1.0) for name in SERIES}
        self._footprint = self.series["footprint"]
        self.per_second = ThinnedTrend(0.25)
        self.last: tuple[int, int, int | None, int | None] | None = None  # (step, footprint, active, cache)

    def observe_step(self, step: int, footprint: int, active: int | None, cache: int | None, rows: int = 1) -> bool:
        """One step's report (the last of ``rows`` held steps); True when it joined the series (a new point)."""
        self.steps_seen += rows
        self.last_step = step
        self.last = (step, footprint, active, cache)
        if step < self._footprint.next or self.steps_seen <= self.warmup:  # most steps: between two kept points
            return False
        if self.first_step is None:
            self.first_step = step
        series = self.series
        self._footprint.add(step, footprint)
        if active is not None:
            series["active"].add(step, active)
        if cache is not None:
            series["cache"].add(step, cache)
        if active is not None and cache is not None:
            series["outside"].add(step, footprint - active - cache)
        return True

    def observe_sample(self, now: float, sampled: int) -> None:
        """A complete footprint sample of the worker's process group."""
        self.per_second.add(now - self.started, sampled)

    @property
    def per_step(self) -> bool:
        return self.steps_seen > 0

    def verdict(self) -> Verdict:
        if self.per_step:
            return judge({name: trend.fit() for name, trend in self.series.items()}, self.threshold)
        # Guard-only: no steps. The threshold per step becomes one per second at one step a second.
        return judge({"footprint": self.per_second.fit()}, self.threshold, "second")

    def entry(self) -> dict[str, Any]:
        """This life for status, history and the summary."""
        verdict = self.verdict()
        return {"life": self.life, "steps": self.steps_seen, "first_step": self.first_step,
                "last_step": self.last_step, **verdict.as_dict()}


def overall(entries: list[dict[str, Any]], threshold: float) -> Verdict:
    """The verdict over several lives: each slope and interval end the median over the lives that measured it
    (one odd life does not decide); per step when any life had steps."""
    per = "step" if any(e["per"] == "step" for e in entries) else "second"
    lives = [e for e in entries if e["per"] == per]
    fits: dict[str, Fit | None] = {}
    for name in SERIES if per == "step" else ("footprint",):
        have = [e for e in lives if e["slopes"].get(name) is not None]
        fits[name] = Fit(_median([e["slopes"][name] for e in have]), _median([e["interval"][name][0] for e in have]),
                         _median([e["interval"][name][1] for e in have]), len(have)) if have else None
    return judge(fits, threshold, per)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
