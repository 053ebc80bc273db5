"""A job's leak forensics carried out: steps and samples into its ``JobDiagnosis``, a cache-clear test per
clear, a census asked of the worker and its answer recorded, each life's verdict in the history.

The diagnosis never changes a decision; nothing here feeds the lifecycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol import Census, Command, Step, Steps, encode
from supervisor.core.clears import Row
from supervisor.core.sizes import format_bytes

if TYPE_CHECKING:
    from supervisor.daemon.job import Job

CENSUS_FEATURE = "census"
DEFAULT_CENSUS_STEPS = 20
MAX_CENSUS_STEPS = 10_000


class CensusRefused(Exception):
    """A census cannot be asked for now; the text says why."""


def _last(column: tuple[Any, ...] | None) -> Any:
    return column[-1] if column is not None else None


def observe(job: Job, message: Step | Steps, now: float, rank: int) -> None:
    """A step (or a frame of held steps) of ``rank``: the lead rank's joins the current life's forensics."""
    life = job.lifecycle.life
    if life is None or rank != min(life.ranks):
        return
    diagnosis = job.diagnosis
    measuring = diagnosis.clears.measuring
    if isinstance(message, Step):
        last: Row = (message.step, message.footprint, message.mlx_active, message.mlx_cache)
        rows = [last] if measuring else []
    else:
        last = (message.step[-1], message.footprint[-1], _last(message.mlx_active), _last(message.mlx_cache))
        rows = [(r.step, r.footprint, r.mlx_active, r.mlx_cache) for r in message.rows()] if measuring else []
    auto = diagnosis.step(life.id, now, last, 1 if isinstance(message, Step) else len(message))
    for row in rows:
        _cleared(job, diagnosis.clears.observe(row))
    if auto:
        try:
            ask_census(job, DEFAULT_CENSUS_STEPS, "diagnose_on_leak", now)
        except CensusRefused as exc:
            job.log.info("census_skipped", reason=str(exc))


def _cleared(job: Job, record: dict[str, Any] | None) -> None:
    """A finished cache-clear test: history, log, events."""
    if record is None:
        return
    job.history_record("cache_clear", **record)
    job.log.info("cache_clear_test", step=record["step"], released=record["released_bytes"],
                 growth_per_step=record["growth_bytes_per_step"], went_on=record["went_on"])
    job.publish(job.name, "log", {"event": "cache_clear", **record})


def sample(job: Job, now: float, sampled: int) -> None:
    """A complete footprint sample of a guard-only job's worker (its growth per second)."""
    life = job.lifecycle.life
    if life is not None and not job.lifecycle.sdk_life(life):  # sdk = false, or "auto" before its hello
        job.diagnosis.sample(life.id, now, sampled)


def clear_asked(job: Job, now: float) -> None:
    job.diagnosis.clears.asked(now, job.diagnosis.last_row())


def life_ended(job: Job) -> None:
    """The current life exited: its verdict goes to the history."""
    _cleared(job, job.diagnosis.clears.flush())
    entry = job.diagnosis.end()
    if entry is not None:
        job.history_record("leak", **entry)


def ask_census(job: Job, steps: int, reason: str, now: float) -> dict[str, Any]:
    """Ask the lead worker for a census over ``steps`` steps; CensusRefused when it cannot take one."""
    if not 1 <= steps <= MAX_CENSUS_STEPS:
        raise CensusRefused(f"steps must be 1..{MAX_CENSUS_STEPS}, got {steps}")
    if job.lifecycle.settings.sdk is False:
        raise CensusRefused("a guard-only job's command does not speak the SDK, so it does not take censuses")
    rank = min(job.lifecycle.settings.ranks)
    identity = job.identities.get(rank)
    if identity is None or job.lifecycle.life is None:
        raise CensusRefused(f"job {job.name!r} has no worker that said hello (state {job.state.name})")
    if CENSUS_FEATURE not in job.features.get(rank, frozenset()):
        raise CensusRefused("its worker does not take censuses (its hello did not list the feature: the Python "
                            "SDK takes them)")
    job.send_frame(identity, encode(Command(Command.CENSUS, reason, steps)))
    asked = {"steps": steps, "reason": reason, "from_step": job.stats.steps_completed}
    job.diagnosis.census_asked = now
    job.history_record("census_asked", **asked)
    return asked


def holder_line(holder: dict[str, Any]) -> str:
    """``history (list, train.py:main): +1 item/step, +40.0 MiB/step of MLX arrays; items: tuple(...)``."""
    parts = []
    if holder["items_per_step"]:
        count = holder["items_per_step"]
        parts.append(f"{count:+g} item{'' if abs(count) == 1 else 's'}/step")
    if holder["mlx_bytes_per_step"]:
        parts.append(f"+{format_bytes(round(holder['mlx_bytes_per_step']))}/step of MLX arrays")
    if holder["other_bytes_per_step"]:
        parts.append(f"+{format_bytes(round(holder['other_bytes_per_step']))}/step outside MLX")
    contents = f"; items: {holder['contents']}" if holder["contents"] else ""
    return f"{holder['name']} ({holder['kind']}, {holder['place']}): {', '.join(parts)}{contents}"


def census_in(job: Job, message: Census) -> dict[str, Any]:
    """The worker's answer: recorded (history, status, summary) and rendered."""
    columns = ("name", "kind", "place", "items", "items_per_step", "mlx_bytes", "mlx_bytes_per_step",
               "other_bytes_per_step", "contents")
    holders = [dict(zip(columns, values, strict=True)) for values in zip(*(getattr(message, c) for c in columns),
                                                                          strict=True)]
    for holder in holders:
        holder["text"] = holder_line(holder)
    record = {"first_step": message.first_step, "last_step": message.last_step, "seconds": message.seconds,
              "arrays": message.arrays, "array_bytes": message.array_bytes, "visited": message.visited,
              "complete": message.visited < message.limit, "holders": holders,
              "culprit": holders[0]["text"] if holders else None}
    job.diagnosis.censuses.append(record)
    job.diagnosis.census_asked = None
    job.history_record("census", **record)
    job.log.info("census", first_step=message.first_step, last_step=message.last_step,
                 seconds=message.seconds, culprit=record["culprit"])
    job.publish(job.name, "log", {"event": "census", "culprit": record["culprit"]})
    return record
