"""The end-of-run report of `mlxsupd run`, a pure function of the summary; and `mlxsupctl init`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.daemon.report import render

MiB = 1 << 20
BASE: dict[str, Any] = {
    "job": "train", "outcome": "finished", "target_steps": 300, "steps_completed": 300, "restarts": 0,
    "restart_reasons": {}, "budget_bytes": 400 * MiB, "max_sampled_bytes": 300 * MiB, "samples": 150,
    "samples_over_budget": 0, "samples_over_kill": 0, "wall_seconds": 7.5, "kind": "sdk",
    "history_path": "/s/jobs/train/history.jsonl", "checkpoint_dir": "/s/jobs/train/checkpoints",
    "log_dir": "/s/logs/jobs/train", "telemetry_path": "/s/jobs/train/telemetry.jsonl", "last_exit_code": 0,
}


def report(**fields: Any) -> str:
    return render({**BASE, **fields})


class TestReport:
    """Each line renders one part of the summary, and only what the summary holds."""

    @pytest.mark.parametrize("fields, expected", [
        ({}, "mlxsupd: train finished in 7.5 s: 300/300 steps, 0 restarts"),
        ({"restarts": 3, "restart_reasons": {"leak": 2, "peak": 1}}, "3 restarts (leak 2, peak 1)"),
        ({"restarts": 1, "restart_reasons": {"leak_predicted": 1}}, "1 restart (leak_predicted 1)"),
        ({"restarts": 1, "restart_reasons": {"hung: rank 1 silent 3.1s; rank 0 waiting in all_sum for 2.4s": 1}},
         "1 restart (hung: rank 1 silent 3.1s; rank 0 waiting in all_sum for 2.4s 1)"),  # a gang hang's shape
        ({"outcome": "fatal", "steps_completed": 12}, "train fatal in 7.5 s: 12/300 steps"),
        ({"kind": "guard-only", "steps_completed": 0, "target_steps": 0}, "no steps reported (guard-only)"),
        ({"outcome": "stopped", "stopped_at_max_steps": True, "max_steps": 50},
         "train stopped at --max-steps 50 in 7.5 s"),
        ({}, "memory: largest sample 300.0 MiB of a 400.0 MiB budget (75%) (150 samples); 0 samples at or over"),
        ({"samples_over_budget": 1, "samples_over_kill": 2}, "1 sample at or over the budget, 2 over the kill"),
        ({"last_exit_code": 2}, "command: last exit code 2"),
        ({"last_exit_code": -15}, "command: last exit killed by SIGTERM"),
        ({"last_exit_code": None}, "command: it never ran to an exit"),
        ({"footprint_bytes_per_second": 40 * MiB}, "footprint: grew 40.0 MiB/s over the last worker's life"),
        ({"plot_path": "/tmp/p.png"}, "plot: /tmp/p.png"),
        ({"plot_error": "plotting needs matplotlib"}, "plot: not drawn: plotting needs matplotlib"),
        ({"summary_path": "/tmp/s.json"}, "summary: /tmp/s.json"),
    ])
    def test_line(self, fields: dict[str, Any], expected: str) -> None:
        assert expected in report(**fields)

    def test_files(self) -> None:
        text = report()
        for label, key in (("logs", "log_dir"), ("history", "history_path"), ("checkpoints", "checkpoint_dir")):
            assert f"  {label}: {BASE[key]}\n" in text

    def test_the_leak_verdict_wins_over_the_slope(self) -> None:
        text = report(leak={"overall": {"verdict": "leak", "meaning": "outside MLX: 40 MiB/s"}},
                      footprint_bytes_per_second=1.0)
        assert "  leak: leak: outside MLX: 40 MiB/s\n" in text and "footprint:" not in text

    def test_the_last_error_is_quoted(self) -> None:
        text = report(outcome="fatal", last_error={"exit_code": 2, "signal": None, "signature": "ValueError",
                                                   "stderr_tail": ["Traceback", "ValueError: num_layers = 16"]},
                      last_exit_code=None)
        assert "command: last exit code 2" in text and "error: ValueError" in text
        assert "    | ValueError: num_layers = 16\n" in text

    def test_without_last_error_the_stderr_tail_is_quoted(self) -> None:
        assert "    | ModuleNotFoundError: No module named 'mlx'" in report(
            last_exit_code=1, last_stderr=["Traceback", "ModuleNotFoundError: No module named 'mlx'"])

    @pytest.mark.parametrize("fields, expected", [
        ({"restarts": 3, "outcome": "fatal"}, "started over from scratch 3 times; with the SDK it resumes from a "
                                              "checkpoint"),
        ({"restarts": 1}, "started over from scratch once"),
        ({"outcome": "stopped"}, "lost its progress when stopped"),
        ({}, "with the SDK a breach costs a checkpoint"),
    ])
    def test_a_guard_only_job_is_shown_the_sdk(self, fields: dict[str, Any], expected: str) -> None:
        text = report(kind="guard-only", **fields)
        assert expected in text and "Your own training loop: the Session SDK" in text
        assert "checkpoints:" not in text

    def test_the_lifecycle_guard_only_flag_counts_too(self) -> None:
        assert "next: " in report(kind=None, guard_only=True, steps_completed=None, target_steps=None)

    def test_an_sdk_job_is_not_told_about_the_sdk(self) -> None:
        assert "next:" not in report(restarts=3)

    def test_an_empty_summary_still_renders(self) -> None:
        assert render({}).startswith("mlxsupd: ? ?")


class TestInit:
    """mlxsupctl init writes a config that loads, for the command given, and never overwrites."""

    def test_starter_config_loads(self, tmp_path: Path) -> None:
        from supervisor.cli.mlxsupctl import main

        assert main(["init", "-o", str(tmp_path / "a.toml")]) == 0
        config = load_config(tmp_path / "a.toml")
        assert list(config.jobs) == ["train"] and config.jobs["train"].train == {"steps": 1000}
        assert "# warn = \"85%\"" in (tmp_path / "a.toml").read_text()

    def test_a_job_for_the_command(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from supervisor.cli.mlxsupctl import main

        leak = str(Path(__file__).parent / "workers" / "plain_leak.py")
        monkeypatch.chdir(tmp_path)
        assert main(["init", "-o", "b.toml", "--budget", "3GiB", "--", sys.executable, leak, "5", "1"]) == 0
        job = load_config(tmp_path / "b.toml").jobs["plain_leak"]
        assert job.command == [sys.executable, leak, "5", "1"] and not job.sdk and job.budget == "3GiB"
        assert job.working_dir == str(tmp_path)

    def test_the_default_path_is_the_platform_config_path(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        from supervisor import paths
        from supervisor.cli.mlxsupctl import main

        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        assert main(["init"]) == 0
        assert load_config(paths.default_config_path()).jobs

    def test_an_existing_file_is_not_overwritten(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        from supervisor.cli.mlxsupctl import main

        (tmp_path / "c.toml").write_text("# mine\n")
        assert main(["init", "-o", str(tmp_path / "c.toml")]) == 2
        assert "exists; not overwritten" in capsys.readouterr().err
        assert (tmp_path / "c.toml").read_text() == "# mine\n"

    def test_a_command_not_found_is_refused(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        from supervisor.cli.mlxsupctl import main

        assert main(["init", "-o", str(tmp_path / "d.toml"), "--", "no-such-program-23"]) == 2
        assert "'no-such-program-23' not found" in capsys.readouterr().err and not (tmp_path / "d.toml").exists()

    def test_doctor_points_to_init(self, tmp_path: Path) -> None:
        from supervisor.cli.doctor import check_config

        check, _ = check_config(tmp_path / "none.toml")
        assert "mlxsupctl init" in check.fix and "deploy/" not in check.fix
