"""supervisor.tools.plot: memory plots from a real supervised run's telemetry and history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.tools.plot import NoTelemetry, PlotError, PlotUnavailable, main, plot_job, resolve_limits
from tests.conftest import SMALL, mlxsupd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def leak_run(config_file: Any, tmp_path: Path, spawn: Any) -> tuple[Path, Path]:
    """A short real `mlxsupd run` with a leak that forces restarts; returns (job dir, summary path)."""
    job = {"budget": "700MiB", "checkpoint_every": 5,
           "train": {**SMALL, "steps": 60, "leak_mb_per_step": 25}}
    config = config_file({"j": job})
    summary = tmp_path / "summary.json"
    proc = spawn(mlxsupd("run", "-c", str(config), "j", "--summary", str(summary), "--log-format", "json"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return tmp_path / "state" / "jobs" / "j", summary


@pytest.mark.slow
def test_plots_a_real_leak_run_to_png_and_svg(leak_run: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    job_dir, summary_path = leak_run
    summary = json.loads(summary_path.read_text())
    assert summary["restarts"] >= 1
    limits = {"warn": summary["warn_bytes"], "budget": summary["budget_bytes"], "kill": summary["kill_bytes"]}

    png = plot_job(job_dir, tmp_path / "out" / "memory.png", limits)
    svg = plot_job(job_dir, tmp_path / "out" / "memory.svg", limits)

    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000
    assert svg.stat().st_size > 10_000
    assert "<svg" in svg.read_text()[:2000]


@pytest.mark.slow
def test_command_line_takes_limits_from_the_summary(leak_run: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    job_dir, summary_path = leak_run
    out = tmp_path / "cli.png"
    assert main([str(job_dir), "-o", str(out), "--summary", str(summary_path)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert capsys.readouterr().out.strip() == str(out)


def test_missing_telemetry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoTelemetry, match=r"telemetry\.jsonl is missing.*mlxsupd"):
        plot_job(tmp_path, tmp_path / "memory.png")


def test_telemetry_without_records_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "telemetry.jsonl").write_text('{"t": 1.0, "k": "other"}\n{torn')
    with pytest.raises(NoTelemetry, match="no sample or step records"):
        plot_job(tmp_path, tmp_path / "memory.png")


def test_command_line_reports_missing_telemetry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "-o", str(tmp_path / "m.png")]) == 1
    assert "no telemetry to plot" in capsys.readouterr().err


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match=r"\.png or \.svg"):
        plot_job(tmp_path, tmp_path / "memory.jpg")


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "telemetry.jsonl").write_text('{"t": 1.0, "k": "sample", "bytes": 100, "pids": 1}\n')
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(PlotUnavailable, match=r"pip install 'mlx-supervisor\[plot\]'"):
        plot_job(tmp_path, tmp_path / "memory.png")


def test_limits_come_from_the_latest_budget_event_when_not_given() -> None:
    history = [{"event": "budget", "budget": 10, "warn": 8, "kill": 11},
               {"event": "budget", "budget": 20, "warn": 17, "kill": 22}]
    assert resolve_limits(None, history) == {"budget": 20, "warn": 17, "kill": 22}
    assert resolve_limits(None, []) == {}
    assert resolve_limits({"budget": 5}, history) == {"budget": 5}
