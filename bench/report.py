"""Targets, pass/miss checks and the printed table of a benchmark run."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Target:
    """A threshold on one metric (``op`` compares value to ``limit``); ``limit`` None: informational."""

    op: str = ""
    limit: float | None = None

    def check(self, value: Any) -> str:
        if self.limit is None:
            return "info"
        if value is None:
            return "n/a"
        compare: Callable[[Any, Any], bool] = {">=": operator.ge, "<=": operator.le, "<": operator.lt,
                                               "==": operator.eq}[self.op]
        return "pass" if compare(value, self.limit) else "miss"

    def text(self, unit: Callable[[Any], str]) -> str:
        return "—" if self.limit is None else f"{self.op} {unit(self.limit)}"


def _ratio(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "null"


def _ms2(value: Any) -> str:
    return f"{value:.2f} ms" if isinstance(value, int | float) else "null"


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "null"


def _seconds(value: Any) -> str:
    return f"{value:.3f} s" if isinstance(value, int | float) else "null"


def _mib(value: Any) -> str:
    return f"{value / MiB:.1f} MiB" if isinstance(value, int | float) else "null"


def _fractions(value: Any) -> str:
    if not isinstance(value, dict) or not value:
        return "null"
    return " / ".join(f"{v * 100:.2f} %" if isinstance(v, int | float) else "null" for v in value.values())


def _fit(value: Any) -> str:
    if not isinstance(value, dict) or value.get("fixed") is None:
        return "null"
    return f"{value['fixed'] * 100:.2f} % + {value['marginal']:.1f} ms"


def _count(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "null"


def _percent(value: Any) -> str:
    return f"{value * 100:.2f} %" if isinstance(value, int | float) else "null"


# (label, path into results, target, formatter)
ROWS: list[tuple[str, tuple[str, ...], Target, Callable[[Any], str]]] = [
    ("overhead_ratio (supervised/unsupervised steps/s)", ("overhead_ratio",), Target(">=", 0.995), _ratio),
    ("  95 % interval (lockstep slices, bootstrap)", ("overhead_ratio_ci95",), Target(),
     lambda v: f"{v[0]:.4f} .. {v[1]:.4f}" if isinstance(v, list) and None not in v else "null"),
    ("  whole-run pairs (median ratio)", ("details", "overhead", "whole_runs", "overhead_ratio"), Target(), _ratio),
    ("  CPU per step: unsupervised ÷ (daemon + worker)", ("overhead_cpu_ratio",), Target(), _ratio),
    ("  daemon CPU / supervised running time", ("details", "overhead", "lockstep",
                                                "daemon_cpu_fraction_of_supervised_time"), Target(), _percent),
    ("  end_step added cost per step", ("details", "overhead", "sdk", "added_us_per_step"), Target(),
     lambda v: f"{v:.1f} µs" if isinstance(v, int | float) else "null"),
    ("reaction_ms (first sample over budget -> decision)", ("reaction_ms",), Target("<=", 150), _ms),
    ("  first sample over budget -> worker exit", ("exit_ms",), Target(), _ms),
    ("overshoot_fraction (peak above budget / budget)", ("overshoot_fraction",), Target("<", 0.5), _ratio),
    ("  overshoot bytes", ("overshoot_bytes",), Target(), _mib),
    ("recovery_seconds (decision -> next productive step)", ("recovery_seconds",), Target("<=", 1.5), _seconds),
    ("  checkpoint (decision -> CheckpointSaved)", ("recovery_phases", "checkpoint"), Target(), _seconds),
    ("  exit (checkpoint -> exit reaped)", ("recovery_phases", "exit"), Target(), _seconds),
    ("  spawn (exit -> spawn)", ("recovery_phases", "spawn"), Target(), _seconds),
    ("  start (spawn -> RUNNING: import + restore)", ("recovery_phases", "start"), Target(), _seconds),
    ("  first step (RUNNING -> first step record)", ("recovery_phases", "first_step"), Target(), _seconds),
    ("goodput unsupervised (hard stop at budget)", ("goodput", "unsupervised"), Target(), _ratio),
    ("goodput stop_at_limit (policy stop)", ("goodput", "stop_at_limit"), Target(), _ratio),
    ("goodput shrink_only (policy shrink-only)", ("goodput", "shrink_only"), Target(), _ratio),
    ("goodput supervised (adaptive)", ("goodput", "supervised"), Target(">=", 0.90), _ratio),
    ("  wall to target, adaptive", ("details", "goodput", "arms", "supervised", "wall_seconds"), Target(), _seconds),
    ("  wall to target, shrink-only", ("details", "goodput", "arms", "shrink_only", "wall_seconds"), Target(),
     _seconds),
    ("  lost per restart, adaptive (wall - useful) / restarts",
     ("details", "goodput", "arms", "supervised", "lost_seconds_per_restart"), Target(), _seconds),
    ("samples_over_kill (adaptive leak run)", ("samples_over_kill",), Target("==", 0), _count),
    ("checkpoint_save_ratio (ours/dd write)", ("checkpoint_save_ratio",), Target(">=", 0.5), _ratio),
    ("checkpoint_load_ratio (ours/dd read)", ("checkpoint_load_ratio",), Target(">=", 0.5), _ratio),
    ("control_p99_ms ('status' round trip)", ("control_p99_ms",), Target("<=", 10), _ms),
    ("telemetry_msgs_per_s (daemon ingest)", ("telemetry_msgs_per_s",), Target(">=", 1000), _count),
    ("daemon_idle_cpu_fraction", ("daemon_idle_cpu_fraction",), Target("<=", 0.01), _percent),
    ("daemon CPU per 1000 msgs at 10 steps/s", ("daemon_cpu_ms_per_1000_msgs", "10"), Target(), _ms),
    ("daemon CPU per 1000 msgs at 100 steps/s", ("daemon_cpu_ms_per_1000_msgs", "100"), Target(), _ms),
    ("daemon CPU per 1000 msgs at 1000 steps/s", ("daemon_cpu_ms_per_1000_msgs", "1000"), Target(), _ms),
    ("  daemon CPU at 10 / 100 / 1000 steps/s", ("daemon_cpu_fraction_by_rate",), Target(), _fractions),
    ("  fixed (per second) + marginal (per 1000 msgs)", ("daemon_sweep_fit",), Target(), _fit),
    ("16 jobs configured, 4 running: daemon CPU", ("sixteen_jobs", "daemon_cpu_fraction"), Target(), _percent),
    ("16 jobs: control_p99_ms ('status' round trip)", ("sixteen_jobs", "control_p99_ms"), Target("<=", 10), _ms),
    ("daemon_rss_bytes", ("daemon_rss_bytes",), Target("<=", 100 * MiB), _mib),
    ("mlx_lm_ratio (supervised/plain mlx_lm.lora it/s)", ("mlx_lm_ratio",), Target(">=", 0.98), _ratio),
    ("  CPU of the training phase: plain ÷ supervised worker", ("details", "mlx_lm", "mlx_lm_cpu_ratio"), Target(),
     _ratio),
    ("  CPU of whole processes: plain ÷ (daemon + worker)", ("details", "mlx_lm", "mlx_lm_process_cpu_ratio"),
     Target(), _ratio),
    ("  mlx-lm checkpoint per restart (size)", ("details", "mlx_lm", "restart", "checkpoint_bytes"), Target(),
     lambda v: f"{v / 1024:.0f} KiB" if isinstance(v, int | float) else "null"),
    ("  mlx-lm checkpoint per restart (write)", ("details", "mlx_lm", "restart", "checkpoint_seconds_median"),
     Target(), _seconds),
    ("  mlx-lm recovery per restart (decision -> next step)", ("details", "mlx_lm", "restart", "recovery", "total"),
     Target(), _seconds),
    ("  mlx-lm restart: start (spawn -> RUNNING: import, load, restore)",
     ("details", "mlx_lm", "restart", "recovery", "start"), Target(), _seconds),
    ("census of the loop's names: built-in model", ("details", "forensics", "census_ms", "builtin", "ms"),
     Target(), _ms2),
    ("  census: tiny mlx-lm model", ("details", "forensics", "census_ms", "tiny_mlx_lm", "ms"), Target(), _ms2),
    ("attribution_cpu_ratio (daemon CPU per msg, with/without)", ("details", "forensics", "attribution_cpu_ratio"),
     Target("<=", 1.05), _ratio),
    ("  daemon CPU per step msg without / with attribution",
     ("details", "forensics", "cpu_us_pair"), Target(), lambda v: f"{v[0]:.1f} / {v[1]:.1f} µs"
     if isinstance(v, list) else "null"),
    ("dashboard: event to page (median / max, s)", ("details", "dashboard", "latency_s"), Target(),
     lambda v: f"{v['median']:.3f} / {v['max']:.3f} s" if isinstance(v, dict) else "null"),
    ("  daemon CPU per 1000 telemetry msgs: dashboard / tail -f",
     ("details", "dashboard", "daemon_cpu_s_per_1000_telemetry", "ratio_dashboard_to_tail"), Target("<=", 1.05),
     _ratio),
    ("gang_step_rate_ratio (2 ranks, supervised/unsupervised)", ("gang_step_rate_ratio",), Target(">=", 0.95),
     _ratio),
    ("  spread of the pairs' ratios: min", ("details", "gang", "ratio_min"), Target(), _ratio),
    ("  max", ("details", "gang", "ratio_max"), Target(), _ratio),
    ("gang_recovery_seconds (breach -> every rank stepping)", ("gang_recovery_seconds",), Target("<=", 3.0),
     _seconds),
    ("  max over restarts", ("details", "gang", "gang_recovery_seconds_max"), Target(), _seconds),
    ("  stop steps equal on every rank", ("details", "gang", "stop_steps_equal"), Target("==", True),
     lambda v: str(v).lower() if isinstance(v, bool) else "null"),
    # The standby section: standby = "auto" against "off", side by side in one run.
    ("standby: recovery, built-in job (decision -> next step)", ("standby", "recovery_seconds", "auto"),
     Target("<=", 0.10), _seconds),
    ("  the same with standby off", ("standby", "recovery_seconds", "off"), Target(), _seconds),
    ("standby: recovery, mlx-lm tiny model", ("standby", "mlx_lm_recovery_seconds", "auto"), Target("<=", 0.5),
     _seconds),
    ("  the same with standby off", ("standby", "mlx_lm_recovery_seconds", "off"), Target(), _seconds),
    ("  restarts served by a standby, built-in", ("details", "standby", "from_standby", "builtin"), Target(),
     lambda v: str(v) if v else "null"),
    ("  restarts served by a standby, mlx-lm", ("details", "standby", "from_standby", "mlx_lm"), Target(),
     lambda v: str(v) if v else "null"),
    ("  mlx-lm recovery from a standby that was waiting already",
     ("details", "standby", "mlx_lm", "auto", "total_from_waiting_standby"), Target(), _seconds),
    ("standby: goodput of the leak scenario", ("standby", "goodput", "auto"), Target(">=", 0.95), _ratio),
    ("  the same with standby off", ("standby", "goodput", "off"), Target(), _ratio),
    ("standby footprint, built-in job (largest sample)", ("standby", "footprint_bytes", "builtin"), Target(),
     _mib),
    ("standby footprint, mlx-lm (largest sample)", ("standby", "footprint_bytes", "mlx_lm"), Target(), _mib),
    ("standby: no-recycle step time within the off arm's 95 % interval",
     ("details", "standby", "no_recycle", "within_off_interval"), Target("==", True),
     lambda v: str(v).lower() if isinstance(v, bool) else "null"),
    ("  step rate, standby auto ÷ off", ("details", "standby", "no_recycle", "step_rate_ratio"), Target(),
     _ratio),
    ("standby: samples over the kill ceiling", ("standby", "samples_over_kill"), Target("==", 0), _count),
]


def lookup(results: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per table line: metric, value, target text, status (pass/miss/n/a/info)."""
    rows = []
    for label, path, target, unit in ROWS:
        value = lookup(results, path)
        rows.append({"metric": label, "key": ".".join(path), "value": value, "shown": unit(value),
                     "target": target.text(unit), "status": target.check(value)})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The table as fixed-width text."""
    headers = ("metric", "value", "target", "pass/miss")
    cells = [(r["metric"], r["shown"], r["target"], r["status"] if r["status"] != "info" else "") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(out)
