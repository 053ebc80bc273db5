"""Pure functions over a job's history and telemetry: reaction, restart phases and useful step time.

Every time here is wall-clock (``time.time()``): history events carry ``time`` and telemetry records ``t``,
both written by the same daemon process, so they can be subtracted.
"""

from __future__ import annotations

from typing import Any

from bench.common import median

ACTING = ("checkpoint_exit", "kill")
PHASES = ("checkpoint", "exit", "spawn", "start", "first_step")


def _events(history: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in history if e.get("event") == kind and isinstance(e.get("time"), int | float)]


def _first_after(items: list[dict[str, Any]], key: str, after: float, before: float = float("inf"),
                 **match: Any) -> dict[str, Any] | None:
    for item in items:
        if after <= item[key] < before and all(item.get(k) == v for k, v in match.items()):
            return item
    return None


def restart_cycles(history: list[dict[str, Any]], telemetry: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per acting decision that led to a new worker life, with the phase durations in seconds:

    checkpoint (decision → CheckpointSaved received), exit (checkpoint, or the decision when there was
    none, → exit reaped), spawn (exit → next spawn), start (spawn → RUNNING: import and restore), first_step
    (RUNNING → first step record of the new life); total = decision → that first step.
    """
    decisions = [e for e in _events(history, "decision") if e.get("action") in ACTING]
    checkpoints, exits, spawns = _events(history, "checkpoint"), _events(history, "exit"), _events(history, "spawn")
    running = [e for e in _events(history, "state") if e.get("new") == "RUNNING"]
    steps = sorted((r for r in telemetry if r.get("k") == "step" and isinstance(r.get("t"), int | float)),
                   key=lambda r: r["t"])
    rows: list[dict[str, Any]] = []
    for index, decision in enumerate(decisions):
        at = decision["time"]
        next_decision = decisions[index + 1]["time"] if index + 1 < len(decisions) else float("inf")
        exit_ = _first_after(exits, "time", at)
        if exit_ is None:
            continue
        checkpoint = _first_after(checkpoints, "time", at, exit_["time"])
        spawn = _first_after(spawns, "time", exit_["time"])
        if spawn is None or spawn["time"] > next_decision:
            continue  # the job stopped here (policy 'stop', or the end of the run)
        started = _first_after(running, "time", spawn["time"])
        step = _first_after(steps, "t", started["time"]) if started else None
        if started is None or step is None:
            continue
        saved_at = checkpoint["time"] if checkpoint else None
        rows.append({
            "step": decision.get("step"), "diagnosis": decision.get("diagnosis"), "action": decision.get("action"),
            "checkpoint": saved_at - at if saved_at is not None else None,
            "exit": exit_["time"] - (saved_at if saved_at is not None else at),
            "spawn": spawn["time"] - exit_["time"], "start": started["time"] - spawn["time"],
            "first_step": step["t"] - started["time"], "total": step["t"] - at,
        })
    return rows


def summarize_cycles(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each phase and of the total over restart cycles, in seconds (3 decimals)."""
    out: dict[str, Any] = {"cycles": len(rows)}
    for name in (*PHASES, "total"):
        values = [r[name] for r in rows if r.get(name) is not None]
        value = median(values)
        out[name] = round(value, 3) if value is not None else None
    totals = [r["total"] for r in rows]
    out["total_max"] = round(max(totals), 3) if totals else None
    return out


def reaction(history: list[dict[str, Any]], telemetry: list[dict[str, Any]], budget: int,
             kill: int) -> dict[str, Any]:
    """From the first sample at/over budget: time to the acting decision and to the worker's exit (ms);
    the largest overshoot above budget (bytes, fraction of budget); samples over the kill ceiling."""
    samples = sorted((r for r in telemetry if r.get("k") == "sample" and isinstance(r.get("bytes"), int)),
                     key=lambda r: r["t"])
    over = next((s for s in samples if s["bytes"] >= budget), None)
    peak = max((s["bytes"] for s in samples), default=0)
    result: dict[str, Any] = {
        "reaction_ms": None, "exit_ms": None, "overshoot_bytes": max(0, peak - budget),
        "overshoot_fraction": round(max(0, peak - budget) / budget, 4) if budget else None,
        "samples_over_budget": sum(s["bytes"] >= budget for s in samples),
        "samples_over_kill": sum(s["bytes"] > kill for s in samples), "diagnosis": None,
    }
    if over is None:
        return result
    # The decision on a sample is logged just after that sample is recorded; allow for t's rounding (0.1 ms).
    decisions = [e for e in _events(history, "decision") if e.get("action") in ACTING]
    decision = _first_after(decisions, "time", over["t"] - 0.001)
    if decision is None:
        return result
    result["reaction_ms"] = round(max(0.0, decision["time"] - over["t"]) * 1000, 1)
    result["diagnosis"] = decision.get("diagnosis")
    exit_ = _first_after(_events(history, "exit"), "time", decision["time"])
    if exit_ is not None:
        result["exit_ms"] = round((exit_["time"] - over["t"]) * 1000, 1)
    return result


def useful_step_seconds(telemetry: list[dict[str, Any]], target: int) -> tuple[float, int]:
    """(Σ step_seconds, distinct steps) over steps 1..target, each step counted once: when a step ran again
    in a later life (after a restart from an older checkpoint) only its last run counts as useful."""
    last: dict[int, float] = {}
    for record in telemetry:
        if record.get("k") != "step":
            continue
        step, seconds = record.get("step"), record.get("step_seconds")
        if isinstance(step, int) and 1 <= step <= target and isinstance(seconds, int | float):
            last[step] = float(seconds)
    return sum(last.values()), len(last)


def goodput(useful_seconds: float, wall_seconds: float, steps_reached: int, target: int) -> dict[str, Any]:
    """busy = useful step time ÷ wall time; completion = steps reached ÷ target; goodput = busy × completion
    (a run that finishes has goodput = busy; one that stops at step 40 of 1000 has goodput ≤ 0.04)."""
    busy = useful_seconds / wall_seconds if wall_seconds > 0 else 0.0
    completion = min(1.0, steps_reached / target) if target else 0.0
    return {"goodput": round(busy * completion, 4), "busy_fraction": round(busy, 4),
            "completion": round(completion, 4), "steps_reached": steps_reached, "target_steps": target,
            "useful_seconds": round(useful_seconds, 3), "wall_seconds": round(wall_seconds, 3)}
