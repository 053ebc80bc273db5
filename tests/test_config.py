"""Config loading is strict: every bad key or value is an error that names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config import ConfigError, load_config, worker_argv

GiB = 1024**3
TOTAL = 16 * GiB


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


class TestValid:
    """Good configs load with defaults filled in and sizes resolved."""

    def test_minimal_job(self, tmp_path: Path) -> None:
        config = load_config(write(tmp_path, '[jobs.a]\nbudget = "4GiB"\n'), total_memory=TOTAL)
        limits = config.jobs["a"].limits(TOTAL)
        assert limits.budget == 4 * GiB
        assert limits.warn == int(0.85 * 4 * GiB) and limits.kill == int(1.1 * 4 * GiB)
        assert config.jobs["a"].batch == 8

    @pytest.mark.parametrize(("budget", "expected"), [('"50%"', 8 * GiB), ('"total - 4GiB"', 12 * GiB),
                                                     ("1073741824", GiB)])
    def test_budget_forms(self, tmp_path: Path, budget: str, expected: int) -> None:
        config = load_config(write(tmp_path, f"[jobs.a]\nbudget = {budget}\n"), total_memory=TOTAL)
        assert config.jobs["a"].limits(TOTAL).budget == expected

    def test_relative_paths_resolve_against_the_config_file(self, tmp_path: Path) -> None:
        config = load_config(write(tmp_path, '[daemon]\nstate_dir = "st"\n[jobs.a]\n'), total_memory=TOTAL)
        assert config.state_dir == tmp_path / "st"
        assert config.checkpoint_dir("a") == tmp_path / "st" / "jobs" / "a" / "checkpoints"

    def test_builtin_train_options_become_worker_arguments(self, tmp_path: Path) -> None:
        config = load_config(write(tmp_path, "[jobs.a.train]\nsteps = 10\nleak_mb_per_step = 5\n"), TOTAL)
        argv = worker_argv(config.jobs["a"])
        assert argv[1:] == ["-m", "worker", "--steps", "10", "--leak-mb-per-step", "5"]

    def test_example_configs_load(self) -> None:
        root = Path(__file__).resolve().parent.parent
        for path in sorted((root / "deploy").glob("*.toml")):
            load_config(path, total_memory=TOTAL)


class TestInvalid:
    """Each bad config names the key and the value."""

    @pytest.mark.parametrize(
        ("text", "needle"),
        [
            ("[jobs.a]\nbudgte = '1GiB'\n", "unknown key 'jobs.a.budgte' (did you mean 'budget'?)"),
            ("[deamon]\n", "unknown key 'deamon'"),
            ("[jobs.a]\nbudget = '16GiB'\n", "at or above total memory"),
            ("[jobs.a]\nbudget = '20GiB'\n", "at or above total memory"),
            ("[jobs.a]\nbudget = 'lots'\n", "lots"),
            ("[jobs.a]\nbudget = '150%'\n", "150%"),
            ("[jobs.a]\nbatch = 0\n", "jobs.a.batch = 0: must be at least 1"),
            ("[jobs.a]\nbatch = '8'\n", "jobs.a.batch = '8': expected int, got str"),
            ("[jobs.a]\nautostart = 1\n", "jobs.a.autostart = 1: expected bool"),
            ("[jobs.a]\nshrink_factor = 1.5\n", "shrink_factor = 1.5"),
            ("[jobs.a]\npolicy = 'yolo'\n", "policy = 'yolo'"),
            ("[jobs.a]\nwarn = '120%'\nkill = '110%'\n", "need warn <= budget < kill"),
            ("[jobs.a]\nhang_timeout = -1\n", "hang_timeout = -1.0: must be positive"),
            ("[jobs.a.train]\nstepz = 5\n", "unknown option 'stepz'"),
            ("[jobs.a.train]\nsteps = 0\n", "--steps must be at least 1"),
            ("[jobs.a.train]\nsteps = 'many'\n", "invalid int value: 'many'"),
            ("[jobs.a.train]\nbatch = 4\n", "set by the supervisor"),
            ("[jobs.a]\ncommand = ['x']\n[jobs.a.train]\nsteps = 4\n", "built-in job only"),
            ("[jobs.'../etc']\n", "job names use letters"),
            ("[daemon]\nsample_interval = 0\n", "daemon.sample_interval = 0.0"),
            ("[daemon]\ncalm_sample_interval = 0.01\n", "daemon.calm_sample_interval = 0.01: must be between "
             "sample_interval (0.05)"),
            ("[daemon]\ngrowth_rate = '0'\n", "daemon.growth_rate: '0' must be more than 0 bytes per second"),
            ("[daemon]\ngrowth_rate = 'fast'\n", "daemon.growth_rate"),
            ("[daemon]\nrun_dir = '/" + "x" * 120 + "'\n", "byte limit of"),
            ("jobs = 3\n", "[jobs] must be a table"),
            ("[jobs.a\n", "not valid TOML"),
        ],
    )
    def test_rejected(self, tmp_path: Path, text: str, needle: str) -> None:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text), total_memory=TOTAL)
        assert needle in str(info.value)
        assert str(tmp_path / "c.toml") in str(info.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="config file not found"):
            load_config(tmp_path / "nope.toml")

    def test_daemon_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        path = write(tmp_path, "[jobs.a]\nbudget = 'lots'\n")
        done = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(path), "a"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert "jobs.a" in done.stderr and "lots" in done.stderr


class TestReference:
    """The config reference in docs/config.md is the generated one."""

    def test_readme_matches_generated_reference(self) -> None:
        from supervisor.tools.docs import config_reference

        root = Path(__file__).resolve().parent.parent
        assert config_reference() in (root / "docs" / "config.md").read_text()
