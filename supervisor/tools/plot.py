"""Memory plots of one supervised job, from its ``telemetry.jsonl`` and ``history.jsonl``.

Two panels: memory against wall time and memory against optimizer step. Each shows the sampled footprint of
the worker's process group (the line the policy acts on), MLX's active and cache memory stacked under it
(reported by the worker every step), the warn/budget/kill bands as horizontal lines, and vertical markers
where a worker exited (a restart) and where the batch changed (annotated ``batch×accum``).

matplotlib is optional (``pip install 'mlx-supervisor[plot]'``) and imported only when a plot is drawn, with
the non-interactive Agg canvas, so the daemon never pays for it.

    python -m supervisor.tools.plot JOB_DIR -o memory.png [--summary summary.json]
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from supervisor.daemon.history import read_history
from supervisor.daemon.recorder import read_records

FORMATS = (".png", ".svg")
INSTALL_HINT = "pip install 'mlx-supervisor[plot]'"
LIMIT_STYLES = {"warn": ("#e69f00", ":"), "budget": ("#d55e00", "--"), "kill": ("#a00000", "-")}


class PlotError(Exception):
    """A plot cannot be drawn; the message says why and what to do."""


class PlotUnavailable(PlotError):
    """matplotlib is not installed."""


class NoTelemetry(PlotError):
    """The job directory holds no usable telemetry."""


@dataclasses.dataclass
class Series:
    """Everything a plot of one job needs, as plain lists, times relative to the first record."""

    t0: float
    samples: list[tuple[float, int]]  # (seconds, sampled bytes)
    steps: list[dict[str, Any]]  # "step" records, with "x" = seconds
    exits: list[tuple[float, int]]  # (seconds, last step) of worker exits followed by a restart
    batches: list[tuple[float, int, str]]  # (seconds, step, "b×a") of batch changes
    history: list[dict[str, Any]]


def load_series(job_dir: Path) -> Series:
    """Read a job directory; NoTelemetry when telemetry.jsonl is missing or has no samples or steps."""
    telemetry_path = job_dir / "telemetry.jsonl"
    records = read_records(telemetry_path)
    samples = [r for r in records if r.get("k") == "sample" and _number(r.get("t")) and _number(r.get("bytes"))]
    steps = [r for r in records if r.get("k") == "step" and _number(r.get("t")) and _number(r.get("step"))]
    if not samples and not steps:
        state = "is missing" if not telemetry_path.exists() else "has no sample or step records"
        raise NoTelemetry(f"no telemetry to plot: {telemetry_path} {state} "
                          "(run the job under mlxsupd first; the daemon records it there)")
    history = read_history(job_dir / "history.jsonl")
    t0 = min(float(r["t"]) for r in samples + steps)
    steps = sorted(({**r, "x": float(r["t"]) - t0} for r in steps), key=lambda r: r["x"])
    exits = _restart_exits(history, t0)
    batches = [(float(e["time"]) - t0, int(e.get("step", 0)), f"{e.get('batch')}×{e.get('accum')}")
               for e in history if e.get("event") == "batch_change" and _number(e.get("time"))]
    return Series(t0, sorted((float(r["t"]) - t0, int(r["bytes"])) for r in samples), steps, exits, batches,
                  history)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _restart_exits(history: list[dict[str, Any]], t0: float) -> list[tuple[float, int]]:
    """Exits that were followed by another spawn (the final exit of a run is not a restart)."""
    exits: list[tuple[float, int]] = []
    pending: tuple[float, int] | None = None
    for event in history:
        kind = event.get("event")
        if kind == "exit" and _number(event.get("time")):
            pending = (float(event["time"]) - t0, int(event.get("step") or 0))
        elif kind == "spawn" and pending is not None:
            exits.append(pending)
            pending = None
    return [e for e in exits if e[0] >= 0]


def resolve_limits(limits: dict[str, int] | None, history: list[dict[str, Any]]) -> dict[str, int]:
    """The given limits, else those of the latest 'budget' history event, else none."""
    if limits:
        return {k: int(v) for k, v in limits.items() if k in LIMIT_STYLES and _number(v)}
    for event in reversed(history):
        if event.get("event") == "budget":
            return {k: int(event[k]) for k in LIMIT_STYLES if _number(event.get(k))}
    return {}


def limits_from_summary(path: Path) -> dict[str, int]:
    """warn/budget/kill bytes from an ``mlxsupd run --summary`` file."""
    summary = json.loads(path.read_text())
    return {k: int(summary[f"{k}_bytes"]) for k in LIMIT_STYLES if _number(summary.get(f"{k}_bytes"))}


def samples_per_step(series: Series) -> list[tuple[int, int]]:
    """(step, largest sample taken while that step ran), by step. A sample belongs to the next step record
    of its life; samples after a life's last step (checkpoint, exit) belong to that last step."""
    times = [r["x"] for r in series.steps]
    exit_times = [e[0] for e in series.exits]
    peaks: dict[int, int] = {}
    for x, sampled in series.samples:
        index = bisect.bisect_left(times, x)
        if index < len(times):
            crossed_exit = bisect.bisect_left(exit_times, x) < bisect.bisect_left(exit_times, times[index])
            if crossed_exit:
                index -= 1
        else:
            index -= 1
        if index < 0:
            continue
        step = int(series.steps[index]["step"])
        peaks[step] = max(peaks.get(step, 0), sampled)
    return sorted(peaks.items())


def _pyplot_free_figure(rows: int) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no GUI); PlotUnavailable without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotUnavailable(f"plotting needs matplotlib: {INSTALL_HINT} ({exc})") from None
    figure = Figure(figsize=(12.5, 4.2 * rows), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _scale(series: Series, limits: dict[str, int]) -> tuple[float, str]:
    top = max([b for _, b in series.samples] + [int(r.get("footprint") or 0) for r in series.steps]
              + list(limits.values()) + [1])
    return (float(1 << 30), "GiB") if top >= 4 << 30 else (float(1 << 20), "MiB")


def _draw_limits(ax: Any, limits: dict[str, int], scale: float) -> None:
    for name, value in sorted(limits.items(), key=lambda kv: kv[1]):
        color, style = LIMIT_STYLES[name]
        ax.axhline(value / scale, color=color, linestyle=style, linewidth=1.2, label=f"{name} {value / scale:.0f}")


def _draw_markers(ax: Any, exits: list[float], batches: list[tuple[float, str]]) -> None:
    """Vertical lines at restarts and at batch changes (the latter annotated b×a at the top)."""
    for i, x in enumerate(exits):
        ax.axvline(x, color="#555555", linestyle="--", linewidth=0.8, alpha=0.7,
                   label="worker exit (restart)" if i == 0 else None)
    for i, (x, text) in enumerate(batches):
        ax.axvline(x, color="#009e73", linestyle="-.", linewidth=1.2, label="batch change" if i == 0 else None)
        ax.annotate(text, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8, color="#009e73",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def _stack(ax: Any, xs: list[float], records: list[dict[str, Any]], scale: float) -> None:
    if not records:
        return
    active = [float(r.get("mlx_active") or 0) / scale for r in records]
    cache = [float(r.get("mlx_cache") or 0) / scale for r in records]
    ax.stackplot(xs, active, cache, colors=["#56b4e9", "#cde8f6"], labels=["MLX active", "MLX cache"],
                 alpha=0.9, step="post")
    # Records without a peak (the zero rows at worker exits) break the line between lives.
    peaks = [float(r["mlx_peak"]) / scale if _number(r.get("mlx_peak")) else math.nan for r in records]
    if any(not math.isnan(y) for y in peaks):
        ax.plot(xs, peaks, color="#cc79a7", linewidth=0.8, linestyle=":", label="MLX peak in step (reported)")


def _draw_time_panel(ax: Any, series: Series, limits: dict[str, int], scale: float, unit: str) -> None:
    """Memory against seconds since the first record; stacks drop to zero at each worker exit."""
    rows = [(r["x"], r) for r in series.steps] + [(x, {}) for x, _ in series.exits]
    rows.sort(key=lambda item: item[0])
    _stack(ax, [x for x, _ in rows], [r for _, r in rows], scale)
    xs: list[float] = []
    ys: list[float] = []
    breaks = iter(sorted(x for x, _ in series.exits))
    next_break = next(breaks, math.inf)
    for x, sampled in series.samples:
        while x > next_break:  # a gap in the line between worker lives
            xs.append(next_break)
            ys.append(math.nan)
            next_break = next(breaks, math.inf)
        xs.append(x)
        ys.append(sampled / scale)
    ax.plot(xs, ys, color="#0b3d91", linewidth=1.0, label="footprint (sampled)")
    _draw_limits(ax, limits, scale)
    _draw_markers(ax, [x for x, _ in series.exits], [(x, text) for x, _, text in series.batches])
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(unit)
    ax.set_title("memory vs time")


def _draw_step_panel(ax: Any, series: Series, limits: dict[str, int], scale: float, unit: str) -> None:
    """Memory against optimizer step (the last life's record wins for a step run twice)."""
    by_step = {int(r["step"]): r for r in series.steps}
    steps = sorted(by_step)
    _stack(ax, [float(s) for s in steps], [by_step[s] for s in steps], scale)
    peaks = samples_per_step(series)
    ax.plot([s for s, _ in peaks], [b / scale for _, b in peaks], color="#0b3d91", linewidth=1.0,
            label="footprint (largest sample in the step)")
    _draw_limits(ax, limits, scale)
    _draw_markers(ax, [float(s) for _, s in series.exits], [(float(s), text) for _, s, text in series.batches])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(unit)
    ax.set_title("memory vs step")


def plot_job(job_dir: Path, out: Path, limits: dict[str, int] | None = None) -> Path:
    """Draw the memory of the job in ``job_dir`` into ``out`` (.png or .svg) and return ``out``.

    ``limits`` maps warn/budget/kill to bytes; when None they come from the latest 'budget' event of the
    job's history, if any, else no limit lines are drawn. Raises NoTelemetry, PlotUnavailable or PlotError.
    """
    job_dir, out = Path(job_dir), Path(out)
    if out.suffix.lower() not in FORMATS:
        raise PlotError(f"cannot write {out}: the file name must end in {' or '.join(FORMATS)}")
    series = load_series(job_dir)
    resolved = resolve_limits(limits, series.history)
    figure = _pyplot_free_figure(rows=2)
    scale, unit = _scale(series, resolved)
    ax_time, ax_step = figure.subplots(2, 1)
    _draw_time_panel(ax_time, series, resolved, scale, unit)
    _draw_step_panel(ax_step, series, resolved, scale, unit)
    for ax in (ax_time, ax_step):
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.25)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    figure.suptitle(_title(job_dir.name, series))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format=out.suffix.lower().lstrip("."))
    return out


def _title(name: str, series: Series) -> str:
    last = max((int(r["step"]) for r in series.steps), default=0)
    return f"job {name}: {last} steps, {len(series.exits)} restarts, {len(series.samples)} samples"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m supervisor.tools.plot",
                                     description="Plot a supervised job's memory against time and step.")
    parser.add_argument("job_dir", type=Path, help="the job's state directory (<state_dir>/jobs/NAME)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file, .png or .svg")
    parser.add_argument("--summary", type=Path, default=None,
                        help="an `mlxsupd run --summary` file to take warn/budget/kill from")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; exit status 0 on success, 1 when the plot cannot be drawn."""
    args = build_parser().parse_args(argv)
    try:
        limits = limits_from_summary(args.summary) if args.summary is not None else None
        path = plot_job(args.job_dir, args.output, limits)
    except (PlotError, OSError, ValueError, KeyError) as exc:
        print(f"plot: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
