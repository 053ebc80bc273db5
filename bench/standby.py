"""The standby: what a recycle costs with a warm successor waiting (``standby = "auto"``) against without ("off").

Three scenarios, each run with both arms in this invocation, in interleaved pairs whose order alternates:

- leak, built-in job: the goodput section's scenario (leak 50 MiB/step, budget 2 GiB, batch 8, the small model);
  recovery per restart, goodput (``bench.analysis.goodput``), samples over the kill ceiling;
- leak, mlx-lm tiny model: the mlx_lm section's restart scenario (LoRA of the tiny Llama under 700 MiB) with a
  slower leak (5 MiB/step in the full run: lives of about 100 steps, so that a standby can finish importing mlx-lm
  before the restart even on a busy machine, where that takes 5-12 s; at the mlx_lm section's 40 MiB/step, which
  the quick run keeps, a life lasts a few seconds); recovery per restart;
- no recycle, built-in job: a slow leak (4 MiB/step) that is over the leak threshold, so a standby is started and
  waits, but never reaches the budget within the run: the mean step time (``step_seconds``, the whole loop) after
  a warm-up, against the off arm's 95 % bootstrap interval.

Recovery is measured the same way in both arms, from the history and telemetry (``handovers``): from the acting
decision to the first step record after the next life's hello. It spans the old worker's checkpoint and exit, and
then either a spawn, the imports and the restore (off) or a go and the restore (auto). The daemon's own figure
(the summary's ``recovery_seconds_median``) is kept beside it. The standby's footprint is the largest sample the
daemon took of a standby (it counts in the job's total).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.analysis import goodput, useful_step_seconds
from bench.common import SMALL, BenchError, median, rounded, run_supervised
from bench.goodput import scenario
from bench.mlx_lm import OPTIONS, build_model

ARMS = ("off", "auto")
ACTING = ("checkpoint_exit", "kill")
WARMUP_STEPS = 20  # left out of the no-recycle step times: the first steps compile
IDLE_LEAK_MB = 4  # over the leak threshold (1 MiB/step): a standby starts; under the budget for the whole run
STARTUP_TIMEOUT = 120.0  # a loaded machine imports mlx-lm slowly; the default is fine too, said for the record


def _events(history: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in history if e.get("event") == kind and isinstance(e.get("time"), int | float)]


def handovers(history: list[dict[str, Any]], telemetry: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per acting decision followed by a new life: ``exit`` (decision → old worker's exit reaped),
    ``start`` (that exit → the next hello: spawn, imports and restore, or go and restore), ``first_step`` (hello →
    the first step record after it), ``total`` (decision → that step) in seconds; ``standby``: the life began as a
    standby's go, ``standby_ready``: that standby was waiting already (not still importing), ``standby_age``: its
    seconds since its spawn. A decision with no new life after it (the run ended) has no row."""
    decisions = [e for e in _events(history, "decision") if e.get("action") in ACTING]
    exits, hellos, gos = _events(history, "exit"), _events(history, "hello"), _events(history, "standby_go")
    steps = sorted((r for r in telemetry if r.get("k") == "step" and isinstance(r.get("t"), int | float)),
                   key=lambda r: r["t"])
    rows: list[dict[str, Any]] = []
    for index, decision in enumerate(decisions):
        at = decision["time"]
        until = decisions[index + 1]["time"] if index + 1 < len(decisions) else float("inf")
        hello = next((h for h in hellos if at < h["time"] < until), None)
        if hello is None:
            continue
        step = next((s for s in steps if s["t"] >= hello["time"]), None)
        exit_ = next((e for e in exits if at <= e["time"] <= hello["time"]), None)
        if step is None:
            continue
        go = next((g for g in gos if at <= g["time"] <= hello["time"]), None)
        rows.append({
            "step": decision.get("step"), "diagnosis": decision.get("diagnosis"), "standby": go is not None,
            "standby_ready": bool(go and go.get("ready")), "standby_age": go.get("waited") if go else None,
            "exit": exit_["time"] - at if exit_ else None,
            "start": hello["time"] - exit_["time"] if exit_ else None,
            "first_step": step["t"] - hello["time"], "total": step["t"] - at})
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the phases and the total (seconds, 3 decimals), the count, and how many came from a standby."""
    out: dict[str, Any] = {"cycles": len(rows), "from_standby": sum(bool(r["standby"]) for r in rows),
                           "from_waiting_standby": sum(bool(r.get("standby_ready")) for r in rows)}
    for name in ("exit", "start", "first_step", "total"):
        value = median([r[name] for r in rows if r.get(name) is not None])
        out[name] = round(value, 3) if value is not None else None
    out["total_max"] = round(max(r["total"] for r in rows), 3) if rows else None
    waiting = median([r["total"] for r in rows if r.get("standby_ready")])
    out["total_from_waiting_standby"] = round(waiting, 3) if waiting is not None else None
    return out


def interval(values: Sequence[float], seed: int = 0, rounds: int = 2000) -> list[float] | None:
    """95 % bootstrap interval of the mean of ``values`` (None for fewer than two)."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(rounds))
    return [means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]]


def _summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    standby = summary.get("standby") or {}
    return {"outcome": summary.get("outcome"), "restarts": summary.get("restarts"),
            "standby_started": standby.get("started"), "standby_used": standby.get("used"),
            "standby_max_bytes": standby.get("max_bytes"), "samples_over_budget": summary.get("samples_over_budget"),
            "samples_over_kill": summary.get("samples_over_kill"),
            "daemon_recovery_seconds_median": rounded(summary.get("recovery_seconds_median"), 3)}


def _check(name: str, summary: dict[str, Any], restarts: bool) -> None:
    if summary.get("outcome") != "finished" or bool(summary.get("restarts")) != restarts:
        raise BenchError(f"standby {name}: {summary.get('outcome')}, {summary.get('restarts')} restarts")


def leak_builtin(work: Path, steps: int, standby: str, timeout: float) -> dict[str, Any]:
    """The goodput section's leak scenario with ``standby``: recovery, goodput, memory."""
    job = {"budget": "2GiB", "batch": 8, "checkpoint_every": 100, "standby": standby, "train": scenario(steps)}
    run = run_supervised(work, job, timeout)
    _check("leak_builtin", run.summary, restarts=True)
    useful, _ = useful_step_seconds(run.telemetry, steps)
    reached = int(run.summary.get("steps_completed") or 0)
    rows = handovers(run.history, run.telemetry)
    return {**goodput(useful, float(run.summary["wall_seconds"]), reached, steps), **_summary_fields(run.summary),
            "recovery": summarize(rows), "cycles": rows}


def leak_mlx_lm(work: Path, options: dict[str, Any], iters: int, leak_mb: float, standby: str,
                timeout: float) -> dict[str, Any]:
    """The mlx_lm section's restart scenario, leaking ``leak_mb`` MiB/step, with ``standby``: recovery and memory."""
    job = {"budget": "700MiB", "checkpoint_every": 0, "standby": standby, "startup_timeout": STARTUP_TIMEOUT,
           "env": {"HF_HUB_OFFLINE": "1", "MLXSUP_INJECT_LEAK_MB_PER_STEP": str(leak_mb)},
           "mlx_lm": {**options, "iters": iters, "adapter_path": str(work / "adapters")}}
    run = run_supervised(work, job, timeout)
    _check("leak_mlx_lm", run.summary, restarts=True)
    rows = handovers(run.history, run.telemetry)
    return {**_summary_fields(run.summary), "wall_seconds": round(run.wall, 3), "recovery": summarize(rows),
            "cycles": rows}


def no_recycle(work: Path, steps: int, standby: str, timeout: float) -> dict[str, Any]:
    """A slow leak that never reaches the budget: step times after the warm-up, with a standby waiting (auto)."""
    job = {"budget": "2GiB", "batch": 8, "checkpoint_every": 0, "standby": standby,
           "train": {**SMALL, "steps": steps, "leak_mb_per_step": IDLE_LEAK_MB}}
    run = run_supervised(work, job, timeout)
    _check("no_recycle", run.summary, restarts=False)
    seconds = [float(r["step_seconds"]) for r in run.telemetry
               if r.get("k") == "step" and isinstance(r.get("step"), int) and r["step"] > WARMUP_STEPS
               and isinstance(r.get("step_seconds"), int | float)]
    return {**_summary_fields(run.summary), "step_seconds": seconds,
            "mean_step_seconds": rounded(sum(seconds) / len(seconds), 6) if seconds else None}


def _pairs(pairs: int) -> list[tuple[int, str]]:
    """(pair, arm) in run order: off first in even pairs, auto first in odd ones, so drift cancels out."""
    return [(index, arm) for index in range(pairs) for arm in (ARMS if index % 2 == 0 else ARMS[::-1])]


def _pooled(runs: dict[str, list[dict[str, Any]]], arm: str) -> dict[str, Any]:
    """The recovery of every restart of the arm's runs, summarized together."""
    return summarize([row for run in runs[arm] for row in run["cycles"]])


def compare_idle(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean step time of each arm (steps pooled over its runs), the off arm's 95 % interval, and whether the
    auto arm's mean lies within it or under it (a standby that waited cost no step time worth measuring)."""
    off = [s for run in runs["off"] for s in run.pop("step_seconds")]
    on = [s for run in runs["auto"] for s in run.pop("step_seconds")]
    if not off or not on:
        raise BenchError("standby no_recycle: no step times")
    off_mean, on_mean, ci = sum(off) / len(off), sum(on) / len(on), interval(off)
    return {"off_mean_step_seconds": round(off_mean, 6), "auto_mean_step_seconds": round(on_mean, 6),
            "off_ci95": [round(v, 6) for v in ci] if ci else None, "steps": {"off": len(off), "auto": len(on)},
            "step_rate_ratio": round(off_mean / on_mean, 4),
            "within_off_interval": None if ci is None else on_mean <= ci[1],
            "standby_waited": all((run.get("standby_started") or 0) >= 1 for run in runs["auto"])}


def measure(work: Path, steps: int, mlx_lm_iters: int, mlx_lm_leak_mb: float, idle_steps: int, pairs: int,
            timeout: float) -> dict[str, Any]:
    """Every scenario in ``pairs`` interleaved pairs of arms; per arm the pooled recovery, and the headline."""
    model, data = build_model(work / "tiny", timeout)
    options = {**OPTIONS, "model": str(model), "data": str(data)}
    builtin: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    lm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    idle: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for index, arm in _pairs(pairs):
        builtin[arm].append(leak_builtin(work / f"builtin-{index}-{arm}", steps, arm, timeout))
        lm[arm].append(leak_mlx_lm(work / f"mlx_lm-{index}-{arm}", options, mlx_lm_iters, mlx_lm_leak_mb, arm,
                                   timeout))
        idle[arm].append(no_recycle(work / f"idle-{index}-{arm}", idle_steps, arm, timeout))
    result: dict[str, Any] = {
        "builtin": {arm: {**_pooled(builtin, arm), "goodput_median": median([r["goodput"] for r in builtin[arm]])}
                    for arm in ARMS},
        "mlx_lm": {arm: _pooled(lm, arm) for arm in ARMS},
        "no_recycle": compare_idle(idle),
        "runs": {"builtin": builtin, "mlx_lm": lm, "no_recycle": idle},
    }
    result.update(headline(result, builtin, lm, idle))
    result["note"] = (f"{pairs} interleaved pair(s) per scenario; built-in leak: 50 MiB/step, 2 GiB, {steps} steps; "
                      f"mlx-lm: tiny model, {mlx_lm_leak_mb:g} MiB/step, 700 MiB, {mlx_lm_iters} iters; no recycle: "
                      f"{IDLE_LEAK_MB} MiB/step, {idle_steps} steps; recovery = decision -> first step after the "
                      "next hello (median over every restart of the arm's runs)")
    return result


def headline(result: dict[str, Any], builtin: dict[str, list[dict[str, Any]]],
             lm: dict[str, list[dict[str, Any]]], idle: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The figures the table checks: auto's, with off's beside them."""
    def largest(*scenarios: dict[str, list[dict[str, Any]]]) -> int | None:
        sizes = [r["standby_max_bytes"] for runs in scenarios for r in runs["auto"] if r.get("standby_max_bytes")]
        return max(sizes) if sizes else None

    auto_runs = [r for runs in (builtin, lm, idle) for r in runs["auto"]]
    return {
        "recovery_seconds": {arm: result["builtin"][arm]["total"] for arm in ARMS},
        "mlx_lm_recovery_seconds": {arm: result["mlx_lm"][arm]["total"] for arm in ARMS},
        "goodput": {arm: result["builtin"][arm]["goodput_median"] for arm in ARMS},
        "footprint_bytes": {"builtin": largest(builtin, idle), "mlx_lm": largest(lm)},
        "samples_over_kill": sum(int(r.get("samples_over_kill") or 0) for r in auto_runs),
        "from_standby": {kind: f"{result[kind]['auto']['from_waiting_standby']} waiting + "
                                f"{result[kind]['auto']['from_standby'] - result[kind]['auto']['from_waiting_standby']}"
                                f" importing of {result[kind]['auto']['cycles']}" for kind in ("builtin", "mlx_lm")},
    }
