"""The mlx-lm job kind's options: mlx_lm.lora's names in, unknown or conflicting ones refused by name."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, load_config, worker_argv, write_config
from worker.mlx_lm.options import OPTIONS, OptionError, configure_job, parse, to_argv
from worker.mlx_lm.requirement import REQUIREMENT, MlxLmUnavailable, check

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 16 << 30


def config(tmp_path: Path, job: dict[str, Any]) -> Path:
    return write_config(tmp_path / "c.toml", {"run_dir": "/tmp/mlxsup-x", "state_dir": str(tmp_path)}, {"j": job})


class TestCommandLine:
    """``python -m worker.mlx_lm`` parses mlx_lm.lora's command line, YAML file and defaults."""

    def test_defaults_are_mlx_lm_loras(self) -> None:
        args = parse([])
        assert (args.batch_size, args.iters, args.learning_rate, args.fine_tune_type) == (4, 1000, 1e-5, "lora")
        assert args.lora_parameters == {"rank": 8, "dropout": 0.0, "scale": 20.0}
        assert args.save_every == 100 and args.optimizer == "adam"

    def test_command_line_wins_over_yaml_which_wins_over_defaults(self, tmp_path: Path) -> None:
        (tmp_path / "c.yaml").write_text("batch_size: 2\nlearning_rate: 1e-4\niters: 50\n"
                                         "lr_schedule:\n  name: cosine_decay\n  arguments: [1e-4, 50]\n")
        args = parse(["-c", str(tmp_path / "c.yaml"), "--batch-size", "8"])
        assert (args.batch_size, args.learning_rate, args.iters) == (8, 1e-4, 50)
        assert args.lr_schedule == {"name": "cosine_decay", "arguments": [1e-4, 50]}

    def test_steps_per_save_is_save_every(self) -> None:
        assert parse(["--steps-per-save", "7"]).save_every == 7
        with pytest.raises(OptionError, match="steps_per_save = 7 conflicts with save_every = 8"):
            parse(["--steps-per-save", "7", "--save-every", "8"])

    @pytest.mark.parametrize(("argv", "needle"), [
        (["--bogus", "1"], "--bogus"),
        (["--batch", "4"], "--batch"),  # no abbreviations
        (["--fine-tune-type", "qlora"], "--fine-tune-type"),
        (["--batch-size", "0"], "batch_size = 0"),
        (["--iters", "3", "--grad-accumulation-steps", "4"], "iters = 3"),
        (["--report-to", "wandb"], "report_to"),
        (["--lr-schedule", "{\"name\": 1}"], "lr_schedule"),
        (["--lora-parameters", "{\"rank\": 8}"], "lora_parameters"),
        (["--clear-cache-threshold", "lots"], "--clear-cache-threshold"),
    ])
    def test_bad_option_is_refused_with_its_name(self, argv: list[str], needle: str) -> None:
        with pytest.raises(OptionError) as info:
            parse(argv)
        assert needle in str(info.value)

    @pytest.mark.parametrize(("yaml", "needle"), [
        ("bogus: 1\n", "bogus: unknown option"),
        ("batch_size: four\n", "batch_size = 'four'"),
        ("- a\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
    ])
    def test_bad_yaml_key_is_refused_with_its_name(self, tmp_path: Path, yaml: str, needle: str) -> None:
        (tmp_path / "c.yaml").write_text(yaml)
        with pytest.raises(OptionError) as info:
            parse(["-c", str(tmp_path / "c.yaml")])
        assert needle in str(info.value) and "c.yaml" in str(info.value)

    def test_worker_exits_2_naming_the_option(self) -> None:
        done = subprocess.run([sys.executable, "-m", "worker.mlx_lm", "--learning-rat", "1"], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2
        assert "--learning-rat" in done.stderr

    def test_same_options_as_mlx_lm_lora(self) -> None:
        """Every option of the installed mlx_lm.lora is one of ours (drift guard for a new mlx-lm)."""
        from mlx_lm.lora import CONFIG_DEFAULTS, build_parser

        theirs = {a.dest for a in build_parser()._actions if a.dest != "help"}
        ours = {o.name for o in OPTIONS}
        assert theirs <= ours
        assert {k for k in CONFIG_DEFAULTS} <= ours
        for option in OPTIONS:
            if option.name in CONFIG_DEFAULTS:
                assert option.default == CONFIG_DEFAULTS[option.name], option.name


class TestAdapterConfig:
    """``adapter_config.json`` is what mlx_lm.lora writes for the same command line."""

    def test_same_keys_and_values_as_mlx_lm_lora_including_train(self, tmp_path: Path) -> None:
        import json

        lora = pytest.importorskip("mlx_lm.lora")
        from mlx_lm.utils import save_config

        from worker.mlx_lm.setup import write_adapter_config

        argv = ["--model", "m", "--train", "--data", "d", "--adapter-path", str(tmp_path / "ours"), "--iters", "7"]
        theirs = vars(lora.build_parser().parse_args(argv))  # as mlx_lm.lora's main() completes it
        theirs.update({k: v for k, v in lora.CONFIG_DEFAULTS.items() if theirs.get(k) is None})
        save_config(theirs, tmp_path / "theirs.json")
        write_adapter_config(parse(argv))
        ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert ours == json.loads((tmp_path / "theirs.json").read_text())
        assert ours["train"] is True


class TestReportTo:
    """report_to stays refused, and the refusal says where the same curves are."""

    def test_refusal_points_at_the_telemetry_stream_and_the_dashboard(self) -> None:
        with pytest.raises(OptionError) as caught:
            parse(["--report-to", "wandb"])
        assert "mlxsupctl tail -f JOB telemetry" in str(caught.value) and "mlxsupctl dashboard" in str(caught.value)


class TestRequirement:
    """A missing or untested mlx-lm is a clear error with the version, the range and the command."""

    def test_in_range(self) -> None:
        assert check("0.32.2") == "0.32.2"
        assert check("0.32.9") == "0.32.9"

    @pytest.mark.parametrize("version", [None, "0.31.0", "0.33.0", "1.0", "weird"])
    def test_refused(self, version: str | None) -> None:
        with pytest.raises(MlxLmUnavailable) as info:
            check(version)
        text = str(info.value)
        assert REQUIREMENT in text and "pip install 'mlx-supervisor[mlx-lm]'" in text
        assert (version or "not installed") in text

    def test_pyproject_extra_pins_the_same_range(self) -> None:
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert extras["mlx-lm"] == [REQUIREMENT]


class TestConfigTable:
    """``[jobs.NAME.mlx_lm]``: mlx-lm's names, the job's batch/accum from them, conflicts are config errors."""

    def test_batch_and_accum_come_from_the_table(self, tmp_path: Path) -> None:
        path = config(tmp_path, {"mlx_lm": {"model": "m", "batch_size": 2, "grad_accumulation_steps": 3,
                                            "iters": 30, "mask_prompt": True}})
        job = load_config(path, total_memory=TOTAL).jobs["j"]
        assert (job.batch, job.accum) == (2, 3)
        argv = worker_argv(job)
        assert argv[:3] == [sys.executable, "-m", "worker.mlx_lm"]
        assert argv[3:] == ["--model", "m", "--batch-size", "2", "--grad-accumulation-steps", "3", "--iters", "30",
                            "--mask-prompt"]
        assert parse(argv[3:]).batch_size == 2

    def test_yaml_file_is_read_relative_to_the_config(self, tmp_path: Path) -> None:
        (tmp_path / "train.yaml").write_text("batch_size: 8\nlearning_rate: 2e-5\n")
        (tmp_path / "model").mkdir()
        path = config(tmp_path, {"mlx_lm": {"config": "train.yaml", "model": "model", "data": "hub/name"}})
        job = load_config(path, total_memory=TOTAL).jobs["j"]
        assert job.batch == 8
        assert job.mlx_lm["config"] == str(tmp_path / "train.yaml")
        assert job.mlx_lm["model"] == str(tmp_path / "model")  # an existing directory
        assert job.mlx_lm["data"] == "hub/name"  # not a path here: a Hugging Face name

    def test_same_batch_set_both_ways_is_fine(self, tmp_path: Path) -> None:
        path = config(tmp_path, {"batch": 4, "mlx_lm": {"model": "m"}})
        assert load_config(path, total_memory=TOTAL).jobs["j"].batch == 4

    @pytest.mark.parametrize(("job", "needle"), [
        ({"mlx_lm": {"bogus": 1}}, "bogus: unknown option"),
        ({"mlx_lm": {"batch_size": "4"}}, "batch_size = '4'"),
        ({"mlx_lm": {"text_feature": "t"}}, "text_feature: set it in the YAML file"),
        ({"mlx_lm": {"checkpoint_dir": "x"}}, "checkpoint_dir is set by the supervisor"),
        ({"command": ["x"], "mlx_lm": {"model": "m"}}, "'command' and 'mlx_lm' are both set"),
        ({"train": {"steps": 3}, "mlx_lm": {"model": "m"}}, "'train' and 'mlx_lm' are both set"),
        ({"sdk": False, "mlx_lm": {"model": "m"}}, "'sdk = false' and 'mlx_lm' are both set"),
        ({"batch": 8, "mlx_lm": {"batch_size": 4}}, "batch = 8 conflicts with mlx_lm.batch_size = 4"),
        ({"batch": 2, "mlx_lm": {"batch_size": 4}}, "batch = 2 conflicts with mlx_lm.batch_size = 4"),  # divides
        ({"batch": 8, "mlx_lm": {"batch_size": 2, "grad_accumulation_steps": 2}},
         "batch = 8 conflicts with mlx_lm.batch_size = 2"),  # does not divide the step's 4 examples
        ({"accum": 2, "mlx_lm": {"model": "m"}}, "accum = 2 conflicts with mlx_lm.grad_accumulation_steps = 1"),
        ({"cache_clear": "1MB", "mlx_lm": {"clear_cache_threshold": "2MB"}}, "cache_clear (1000000 bytes)"),
        ({"mlx_lm": {"config": "missing.yaml"}}, "mlx_lm.config: cannot read"),
    ])
    def test_conflicts_and_unknown_keys_are_config_errors(self, tmp_path: Path, job: dict[str, Any],
                                                          needle: str) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(config(tmp_path, job), total_memory=TOTAL)
        assert needle in str(info.value) and "jobs.j" in str(info.value)

    def test_to_argv_leaves_out_false_flags(self) -> None:
        assert to_argv({"test": False, "grad_checkpoint": True}) == ["--grad-checkpoint"]

    def test_untested_mlx_lm_is_a_config_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("worker.mlx_lm.requirement.installed_version", lambda: "0.40.0")
        with pytest.raises(MlxLmUnavailable):
            configure_job({"model": "m"}, {}, tmp_path, None)
        with pytest.raises(ConfigError, match=r"mlx-lm 0\.40\.0 is installed"):
            load_config(config(tmp_path, {"mlx_lm": {"model": "m"}}), total_memory=TOTAL)

    def test_daemon_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        path = config(tmp_path, {"mlx_lm": {"model": "m", "leraning_rate": 1e-4}})
        done = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(path), "j"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "leraning_rate" in done.stderr


def test_options_import_neither_mlx_nor_mlx_lm() -> None:
    """The daemon validates mlx_lm tables without importing MLX or mlx-lm."""
    probe = ("import sys, supervisor.config, worker.mlx_lm.options, worker.mlx_lm.requirement; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm', 'yaml'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stderr


def test_mlx_lm_worker_imports_only_worker_and_protocol() -> None:
    """worker.mlx_lm, like the rest of worker/, never imports the daemon's packages."""
    probe = ("import sys, worker.mlx_lm.run, worker.mlx_lm.__main__; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'supervisor', 'worker', 'protocol', 'mlx_lm'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip().splitlines()[-1] == "['mlx_lm', 'protocol', 'worker']", done.stderr
