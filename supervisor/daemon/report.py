"""The short human report ``mlxsupd run`` writes to stderr at the end: a pure function of the JSON summary.

It renders what the summary holds and nothing else, so it can be tested with tables of summaries: the outcome,
steps and restarts by reason, the largest sample against the budget, the leak diagnosis (``leak.overall`` when
the summary has it, else the footprint's slope), where the files are, how the command last ended and its last
error lines, and for a guard-only command what the SDK would have saved.
"""

from __future__ import annotations

import signal
from typing import Any

from supervisor.core.sizes import format_bytes

SDK_SECTION = 'docs/sdk.md, "Your own training loop: the Session SDK"'
MAX_ERROR_LINES = 8


def render(summary: dict[str, Any]) -> str:
    """The report: a few lines, each about one thing, ending in a newline."""
    lines = [_headline(summary), _memory(summary)]
    lines += [line for line in (_diagnosis(summary), _exit(summary)) if line]
    lines += _last_error(summary)
    lines += _files(summary)
    if _guard_only(summary):
        lines.append(_next_step(summary))
    return "\n".join(lines) + "\n"


def _guard_only(summary: dict[str, Any]) -> bool:
    return summary.get("kind") == "guard-only" or summary.get("guard_only") is True


def _headline(summary: dict[str, Any]) -> str:
    job, outcome = summary.get("job", "?"), summary.get("outcome", "?")
    steps = summary.get("steps_completed") or 0
    target = summary.get("target_steps") or 0
    if _guard_only(summary):
        progress = "no steps reported (guard-only)"
    else:
        progress = f"{steps}/{target} steps" if target else f"{steps} steps"
    if summary.get("stopped_at_max_steps"):
        outcome = f"stopped at --max-steps {summary.get('max_steps')}"
    restarts = summary.get("restarts") or 0
    reasons = summary.get("restart_reasons") or {}
    by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    restart_text = f"{restarts} restart{'s' if restarts != 1 else ''}" + (f" ({by_reason})" if by_reason else "")
    seconds = summary.get("wall_seconds")
    took = f" in {seconds:.1f} s" if isinstance(seconds, int | float) else ""
    return f"mlxsupd: {job} {outcome}{took}: {progress}, {restart_text}"


def _memory(summary: dict[str, Any]) -> str:
    largest, budget = summary.get("max_sampled_bytes") or 0, summary.get("budget_bytes") or 0
    share = f" ({100 * largest / budget:.0f}%)" if budget else ""
    over = summary.get("samples_over_budget") or 0
    kill = summary.get("samples_over_kill") or 0
    tail = f"; {over} sample{'s' if over != 1 else ''} at or over the budget" + (
        f", {kill} over the kill ceiling" if kill else "")
    return (f"  memory: largest sample {format_bytes(largest)} of a {format_bytes(budget)} budget{share}"
            f" ({summary.get('samples') or 0} samples){tail}")


def _diagnosis(summary: dict[str, Any]) -> str | None:
    leak = summary.get("leak")
    overall = leak.get("overall") if isinstance(leak, dict) else None
    if isinstance(overall, dict) and overall.get("verdict"):
        meaning = f": {overall['meaning']}" if overall.get("meaning") else ""
        return f"  leak: {overall['verdict']}{_footprint_rate(overall)}{meaning}"
    slope = summary.get("footprint_bytes_per_second")
    if not isinstance(slope, int | float):
        return None
    direction = "grew" if slope > 0 else "shrank" if slope < 0 else "stayed flat,"
    rate = f" {format_bytes(round(abs(slope)))}/s" if slope else ""
    return f"  footprint: {direction}{rate} over the last worker's life (Theil-Sen over its samples)"


def _footprint_rate(overall: dict[str, Any]) -> str:
    """' (footprint +40.0 MiB/step, 95% 38.1 MiB to 41.9 MiB)', or '' when the footprint was not fitted."""
    slope = (overall.get("slopes") or {}).get("footprint")
    if not isinstance(slope, int | float):
        return ""
    per = overall.get("per") or "step"
    sign = "+" if slope >= 0 else "-"
    text = f" (footprint {sign}{format_bytes(round(abs(slope)))}/{per}"
    low_high = (overall.get("interval") or {}).get("footprint")
    if isinstance(low_high, list | tuple) and len(low_high) == 2 and all(isinstance(v, int | float) for v in low_high):
        text += f", 95% {format_bytes(round(low_high[0]))} to {format_bytes(round(low_high[1]))}"
    return text + ")"


def _exit(summary: dict[str, Any]) -> str | None:
    code = summary.get("last_exit_code")
    error = summary.get("last_error")
    if not isinstance(code, int) and isinstance(error, dict):
        code = error.get("exit_code")
    if not isinstance(code, int):
        return "  command: it never ran to an exit" if "last_exit_code" in summary else None
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"  command: last exit killed by {name}"
    return f"  command: last exit code {code}"


def _last_error(summary: dict[str, Any]) -> list[str]:
    error = summary.get("last_error")
    if not isinstance(error, dict):
        error = {"stderr_tail": summary.get("last_stderr")} if summary.get("last_stderr") else None
    if not isinstance(error, dict):
        return []
    tail = [str(line) for line in error.get("stderr_tail") or []][-MAX_ERROR_LINES:]
    lines = []
    if error.get("signature"):
        lines.append(f"  error: {error['signature']}")
    if tail:
        lines.append("  its last stderr lines:")
        lines += [f"    | {line}" for line in tail]
    return lines


def _files(summary: dict[str, Any]) -> list[str]:
    names = (("logs", "log_dir"), ("history", "history_path"), ("telemetry", "telemetry_path"),
             ("checkpoints", "checkpoint_dir"), ("summary", "summary_path"), ("plot", "plot_path"))
    lines = [f"  {label}: {summary[key]}" for label, key in names
             if summary.get(key) and not (key == "checkpoint_dir" and _guard_only(summary))]
    if summary.get("plot_error"):
        lines.append(f"  plot: not drawn: {summary['plot_error']}")
    return lines


def _next_step(summary: dict[str, Any]) -> str:
    restarts = summary.get("restarts") or 0
    if restarts:
        times = "once" if restarts == 1 else f"{restarts} times"
        return (f"  next: it started over from scratch {times}; with the SDK it resumes from a checkpoint "
                f"instead ({SDK_SECTION})")
    if summary.get("outcome") != "finished":
        return (f"  next: it lost its progress when stopped; with the SDK it checkpoints first and resumes "
                f"({SDK_SECTION})")
    return f"  next: with the SDK a breach costs a checkpoint, not the run ({SDK_SECTION})"
