"""`mlxsupd run [OPTIONS] -- CMD`: the command line becomes the Config a file would give; bad input names itself."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.mlxsupd import build_parser
from supervisor.cli.oneline import Command, UsageError, build, classify, default_budget, job_name, mlx_lm_arguments
from supervisor.config import load_config, write_config
from tests.conftest import ROOT

GiB = 1 << 30
TOTAL = 24 * GiB
LEAK = str(ROOT / "tests" / "workers" / "plain_leak.py")
SDK_LEAK = str(ROOT / "tests" / "workers" / "sdk_leak.py")


def args_of(*options: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *options])


def one_line(tmp_path: Path, argv: list[str], *options: str, total: int = TOTAL) -> tuple[Any, str]:
    return build(args_of("--state-dir", str(tmp_path / "s"), *options), argv, total, tmp_path)


class TestCommand:
    """The command after '--': found, executable, and of which kind."""

    @pytest.mark.parametrize("argv, expected", [
        (["mlx_lm.lora", "--model", "m"], ["--model", "m"]),
        (["/venv/bin/mlx_lm.lora", "--train"], ["--train"]),
        (["mlx_lm", "lora", "--model", "m"], ["--model", "m"]),
        (["python", "-m", "mlx_lm", "lora", "--iters", "3"], ["--iters", "3"]),
        (["python3.11", "-m", "mlx_lm.lora", "--iters", "3"], ["--iters", "3"]),
        (["/usr/bin/python3", "-m", "mlx_lm", "lora"], []),
        (["mlx_lm", "generate", "--model", "m"], None),
        (["python", "-m", "mlx_lm", "generate"], None),
        (["python", "train.py"], None),
    ])
    def test_mlx_lm_spellings(self, argv: list[str], expected: list[str] | None) -> None:
        assert mlx_lm_arguments(argv) == expected

    @pytest.mark.parametrize("argv, name", [
        ([sys.executable, "train.py"], "train"), ([sys.executable, "-m", "pkg.fine_tune"], "fine_tune"),
        (["mlx_lm.lora", "--model", "m"], "lora"), (["/bin/true"], "true"), (["./run me.sh"], "run-me"),
    ])
    def test_names_come_from_the_command(self, argv: list[str], name: str) -> None:
        assert job_name(Command(argv, mlx_lm_arguments(argv), False), None) == name

    def test_no_command_after_the_separator(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="no command after '--'"):
            classify([], tmp_path)

    def test_a_command_not_on_path(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="'no-such-program-23' not found on PATH"):
            classify(["no-such-program-23"], tmp_path)

    def test_a_file_that_is_not_executable(self, tmp_path: Path) -> None:
        (tmp_path / "run.sh").write_text("echo hi\n")
        with pytest.raises(UsageError, match=r"'\./run\.sh' is not executable"):
            classify(["./run.sh"], tmp_path)

    def test_a_missing_script(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match=r"script 'nope\.py' not found"):
            classify([sys.executable, "nope.py"], tmp_path)

    def test_a_script_importing_the_sdk_is_an_sdk_job(self, tmp_path: Path) -> None:
        assert classify([sys.executable, SDK_LEAK, "3", "1"], tmp_path).sdk_guess
        assert not classify([sys.executable, LEAK, "3", "1"], tmp_path).sdk_guess


class TestConfig:
    """The one-line form builds the Config a file would give."""

    def test_same_config_as_the_file(self, tmp_path: Path) -> None:
        config, name = one_line(tmp_path, [sys.executable, LEAK, "10", "1"], "--budget", "2GiB", "--kill", "120%")
        assert name == "plain_leak"
        state = str((tmp_path / "s").resolve())
        path = write_config(tmp_path / "c.toml", {"state_dir": state, "run_dir": str(config.run_dir)},
                            {name: {"command": [sys.executable, LEAK, "10", "1"], "sdk": "auto", "budget": "2GiB",
                                    "kill": "120%", "working_dir": str(tmp_path)}})
        assert config.jobs == load_config(path, total_memory=TOTAL).jobs
        assert config.state_dir == Path(state) and config.daemon == load_config(path, total_memory=TOTAL).daemon

    def test_sdk_choice(self, tmp_path: Path) -> None:
        assert one_line(tmp_path, [sys.executable, SDK_LEAK, "3", "1"])[0].jobs["sdk_leak"].sdk == "auto"
        assert not one_line(tmp_path, [sys.executable, SDK_LEAK, "3", "1"], "--sdk", "no")[0].jobs["sdk_leak"].sdk
        assert one_line(tmp_path, [sys.executable, LEAK, "3", "1"], "--sdk", "yes")[0].jobs["plain_leak"].sdk

    @pytest.mark.parametrize("total, budget", [
        (8 * GiB, 4 * GiB), (16 * GiB, 8 * GiB), (24 * GiB, 16 * GiB), (64 * GiB, 48 * GiB), (128 * GiB, 96 * GiB),
        (1 * GiB, GiB // 2),
    ])
    def test_default_budget_leaves_room_and_stays_valid(self, tmp_path: Path, total: int, budget: int) -> None:
        assert default_budget(total) == budget
        config, name = one_line(tmp_path, [sys.executable, LEAK, "3", "1"], total=total)
        assert config.jobs[name].limits(total).budget == budget

    @pytest.mark.parametrize("options, message", [
        (["--budget", "24GiB"], "--budget 24GiB: budget 24GiB is at or above total memory"),
        (["--budget", "30GiB"], "--budget 30GiB: budget 30GiB is at or above total memory"),
        (["--budget", "2GiB", "--kill", "2GiB"], r"--kill 2GiB \(2.00 GiB\) is at or under the budget"),
        (["--budget", "2GiB", "--kill", "90%"], r"--kill 90% \(1.80 GiB\) is at or under the budget"),
        (["--budget", "lots"], "--budget lots: invalid size 'lots'"),
        (["--sdk", "no", "--batch", "4"], "--batch applies to SDK workers"),
        (["--sdk", "no", "--max-steps", "4"], "--max-steps applies to SDK workers"),
    ])
    def test_bad_values_name_themselves(self, tmp_path: Path, options: list[str], message: str) -> None:
        with pytest.raises(UsageError, match=message):
            one_line(tmp_path, [sys.executable, LEAK, "3", "1"], *options)

    def test_restart_never_on_an_sdk_job_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="restart applies to guard-only jobs"):
            one_line(tmp_path, [sys.executable, SDK_LEAK, "3", "1"], "--sdk", "yes", "--restart", "never")

    def test_config_file_gives_daemon_and_job_defaults(self, tmp_path: Path) -> None:
        path = write_config(tmp_path / "c.toml", {"sample_interval": 0.1, "calm_sample_interval": 0.5},
                            {"plain_leak": {"budget": "3GiB", "kill_grace": 7.0}})
        config, name = one_line(tmp_path, [sys.executable, LEAK, "3", "1"], "-c", str(path))
        assert config.daemon.sample_interval == 0.1 and config.jobs[name].kill_grace == 7.0
        assert config.jobs[name].budget == "3GiB"

    def test_budget_conflicting_with_the_file_names_both(self, tmp_path: Path) -> None:
        path = write_config(tmp_path / "c.toml", {}, {"plain_leak": {"budget": "3GiB"}})
        with pytest.raises(UsageError, match=r"--budget 4GiB conflicts with jobs.plain_leak.budget = '3GiB'"):
            one_line(tmp_path, [sys.executable, LEAK, "3", "1"], "-c", str(path), "--budget", "4GiB")

    def test_a_command_differing_from_the_file_names_both(self, tmp_path: Path) -> None:
        path = write_config(tmp_path / "c.toml", {}, {"plain_leak": {"command": ["python", "other.py"]}})
        with pytest.raises(UsageError, match=r"the command after -- .* conflicts with jobs.plain_leak.command"):
            one_line(tmp_path, [sys.executable, LEAK, "3", "1"], "-c", str(path))

    def test_help_states_the_default_budget(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "default total - max(8GiB, 25%), and never under half of total memory" in text
        assert "mlxsupd run [OPTIONS] [-c CONFIG] -- CMD [ARGS...]" in text

    def test_a_long_state_dir_gets_a_short_run_dir(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   run_dir: Path) -> None:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
        deep = tmp_path / ("d" * 60) / ("e" * 60)
        config, _ = build(args_of("--state-dir", str(deep)), [sys.executable, LEAK, "3", "1"], TOTAL, tmp_path)
        assert config.run_dir.parent == run_dir / "mlxsup" and config.state_dir == deep


class TestMlxLm:
    """An mlx-lm command becomes the mlx_lm job kind, with its options checked as in config."""

    @pytest.fixture(autouse=True)
    def _needs_mlx_lm(self) -> None:
        pytest.importorskip("mlx_lm")

    def test_options_become_the_mlx_lm_table(self, tmp_path: Path) -> None:
        (tmp_path / "data").mkdir()
        config, name = one_line(tmp_path, ["mlx_lm.lora", "--model", "org/model", "--train", "--data", "data",
                                           "--iters", "20", "--batch-size", "2", "--grad-accumulation-steps", "2"])
        job = config.jobs[name]
        assert name == "lora" and not job.command and job.sdk
        assert job.mlx_lm["data"] == str(tmp_path / "data") and job.mlx_lm["model"] == "org/model"
        assert (job.batch, job.accum) == (2, 2)

    def test_an_unsupported_option_is_named(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="--wandb"):
            one_line(tmp_path, ["python", "-m", "mlx_lm", "lora", "--model", "m", "--wandb", "x"])

    def test_report_to_is_refused_as_in_config(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="report_to = 'wandb': not supported"):
            one_line(tmp_path, ["mlx_lm", "lora", "--model", "m", "--report-to", "wandb"])

    def test_batch_belongs_to_mlx_lm_options(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError, match="--batch does not apply to an mlx-lm command"):
            one_line(tmp_path, ["mlx_lm.lora", "--model", "m"], "--batch", "2")


class TestUsage:
    """mlxsupd's own command line: the two forms do not mix."""

    @pytest.mark.parametrize("argv, message", [
        (["run"], "give the command to supervise after '--'"),
        (["run", "--budget", "2GiB", "python", "x.py"], "put the command after '--': mlxsupd run [OPTIONS] -- "
                                                         "python x.py"),
        (["run", "--budget", "2GiB", "j"], "--budget apply to a command after '--'"),
        (["run", "-c", "x.toml", "j", "--", "true"], "not both"),
        (["run", "--plot", "x.pdf", "--", "true"], "give a .png or .svg"),
        (["run", "--", "no-such-program-23"], "'no-such-program-23' not found on PATH"),
        (["run", "--"], "no command after '--'"),
    ])
    def test_usage_errors_exit_2_and_name_the_problem(self, argv: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        from supervisor.cli.mlxsupd import main

        monkeypatch.chdir(tmp_path)
        assert main(argv) == 2
        assert message in capsys.readouterr().err


class TestRanks:
    """--ranks N: a gang of N ranks on this host, its budget per rank; bad N names itself."""

    def test_an_mlx_lm_command_becomes_a_gang_with_a_per_rank_batch(self, tmp_path: Path) -> None:
        pytest.importorskip("mlx_lm")
        config, name = one_line(tmp_path, ["mlx_lm.lora", "--model", "org/model", "--batch-size", "4"],
                                "--ranks", "2")
        job = config.jobs[name]
        layout = config.layout(name)
        assert job.ranks == 2 and layout is not None and layout.world == 2
        assert job.batch == 2  # mlx-lm's batch_size is the gang's; each rank trains half of it
        assert job.limits(TOTAL).budget == default_budget(TOTAL) // 2

    def test_an_sdk_script_runs_as_a_gang(self, tmp_path: Path) -> None:
        config, name = one_line(tmp_path, [sys.executable, SDK_LEAK], "--ranks", "2", "--budget", "2GiB")
        assert config.jobs[name].ranks == 2 and config.jobs[name].sdk is True

    @pytest.mark.parametrize("argv, options, message", [
        ([sys.executable, SDK_LEAK], ["--ranks", "0"], "--ranks 0: give 1 or more"),
        ([sys.executable, SDK_LEAK], ["--ranks", "-3"], "--ranks -3: give 1 or more"),
        ([sys.executable, SDK_LEAK], ["--ranks", "9999"], "--ranks 9999: this host has"),
        ([sys.executable, SDK_LEAK], ["--ranks", "2", "--budget", "16GiB"], "--ranks 2 x budget 16GiB do not fit"),
        ([sys.executable, LEAK], ["--ranks", "2"], "does not import worker.Session; give --sdk yes"),
        ([sys.executable, SDK_LEAK], ["--ranks", "2", "--sdk", "no"], "(--sdk no)"),
    ])
    def test_bad_ranks_name_themselves(self, tmp_path: Path, argv: list[str], options: list[str],
                                       message: str, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        with pytest.raises(UsageError, match=re.escape(message)):
            one_line(tmp_path, argv, *options)

    def test_a_batch_size_that_does_not_split_is_refused(self, tmp_path: Path) -> None:
        pytest.importorskip("mlx_lm")
        with pytest.raises(UsageError, match="batch_size = 3 does not split over the gang's 2 ranks"):
            one_line(tmp_path, ["mlx_lm.lora", "--model", "m", "--batch-size", "3"], "--ranks", "2")

    def test_not_a_number(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            args_of("--ranks", "two", "--", "true")
        assert "argument --ranks: invalid int value: 'two'" in capsys.readouterr().err

    @pytest.mark.parametrize("argv, shown", [
        (["mlx.launch", "-n", "2", "--backend", "ring", "mlx_lm.lora", "--model", "m"],
         "mlxsupd run --ranks N -- mlx_lm.lora --model m"),
        (["python", "-m", "mlx.launch", "--hosts=a,b", "--verbose", "train.py", "--x"],
         "mlxsupd run --ranks N -- python train.py --x"),
    ])
    def test_mlx_launch_is_refused_with_the_one_line_form_that_runs_it(self, tmp_path: Path, argv: list[str],
                                                                         shown: str) -> None:
        with pytest.raises(UsageError, match=r"mlx\.launch reports success when a rank dies") as info:
            classify(argv, tmp_path)
        assert str(info.value).endswith(shown)
