"""The mlx-lm job kind end to end: real `mlxsupd run`, real worker processes, the real mlx-lm pieces.

Every supervised run is compared with one uninterrupted in-process run of the same options: recycling after a
leak and resuming after a SIGKILL must give the same trainable parameters and optimizer state bit for bit; a
peak that shrinks 4x1 to 2x2 must stay within 1e-5 (max abs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
import pytest

from protocol.checkpoints import latest_step
from supervisor.daemon.history import read_history
from supervisor.daemon.recorder import read_records
from tests._mlx_lm import arrays, bitwise_equal, build_tiny, max_abs_difference, offline_env, train_in_process
from tests.conftest import mlxsupd
from worker.checkpoint import load_latest

pytestmark = pytest.mark.slow
ITERS = 30
Tiny = tuple[Path, Path]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run at 4x1: trainable parameters and optimizer state after ITERS steps."""
    return arrays(train_in_process(*tiny, tmp_path_factory.mktemp("reference"), ITERS))


def job(tiny: Tiny, work: Path, budget: str, **env: str) -> dict[str, Any]:
    """A LoRA job with the options of tests._mlx_lm.BASE_OPTIONS (the reference's)."""
    return {"budget": budget, "checkpoint_every": 10, "backoff_initial": 0.2, "env": {"HF_HUB_OFFLINE": "1", **env},
            "mlx_lm": {"model": str(tiny[0]), "data": str(tiny[1]), "iters": ITERS, "num_layers": 4,
                       "learning_rate": 1e-4, "val_batches": 2, "steps_per_eval": 10, "save_every": 10,
                       "adapter_path": str(work / "adapters")}}


class Run:
    """One `mlxsupd run` of job 'j' in ``work``: its exit status, summary, history and telemetry."""

    def __init__(self, work: Path, process: subprocess.Popen[str]) -> None:
        self.work = work
        self.process = process

    def wait(self, timeout: float = 300) -> Run:
        _, stderr = self.process.communicate(timeout=timeout)
        summary = self.work / "summary.json"
        assert summary.exists(), stderr[-3000:]
        self.code = self.process.returncode
        self.summary = json.loads(summary.read_text())
        job_dir = self.work / "state" / "jobs" / "j"
        self.history = read_history(job_dir / "history.jsonl")
        self.telemetry = [r for r in read_records(job_dir / "telemetry.jsonl") if r["k"] == "step"]
        return self

    @property
    def checkpoints(self) -> Path:
        return self.work / "state" / "jobs" / "j" / "checkpoints"

    def final(self) -> dict[str, Any]:
        loaded = load_latest(self.checkpoints)
        assert loaded is not None and loaded.step == ITERS
        return arrays(loaded)


def start(config_file: Any, tmp_path: Path, spawn: Any, spec: dict[str, Any]) -> Run:
    path = config_file({"j": spec})
    argv = mlxsupd("run", "-c", str(path), "j", "--summary", str(tmp_path / "summary.json"), "--log-format", "json")
    return Run(tmp_path, spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


class TestSupervisedFineTune:
    """Breaches and crashes of an mlx-lm fine-tune end in a restart that continues the same math."""

    def test_leak_is_recycled_and_the_run_finishes_bitwise_equal(self, tiny: Tiny, reference: dict[str, Any],
                                                                  config_file: Any, tmp_path: Path,
                                                                  spawn: Any) -> None:
        run = start(config_file, tmp_path, spawn,
                    job(tiny, tmp_path, "600MiB", MLXSUP_INJECT_LEAK_MB_PER_STEP="25")).wait()
        assert run.code == 0 and run.summary["outcome"] == "finished"
        assert run.summary["steps_completed"] == ITERS
        assert run.summary["restarts"] >= 1
        assert set(run.summary["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert run.summary["samples_over_budget"] == 0
        assert bitwise_equal(run.final(), reference)
        validated = [r for r in run.telemetry if "val_loss" in r]
        assert [r["step"] for r in validated] == [10, 20, 30] and all(r["tokens_per_second"] > 0
                                                                      for r in run.telemetry)
        self._check_adapters_load_in_mlx_lm(tiny, tmp_path / "adapters", tmp_path)

    def test_peak_shrinks_4x1_to_2x2_within_1e_5_of_the_unshrunk_run(self, tiny: Tiny, reference: dict[str, Any],
                                                                      config_file: Any, tmp_path: Path,
                                                                      spawn: Any) -> None:
        spec = {**job(tiny, tmp_path, "500MiB", MLXSUP_INJECT_PEAK_MB_PER_SAMPLE="100"), "kill": "200%"}
        run = start(config_file, tmp_path, spawn, spec).wait()
        assert run.code == 0 and run.summary["outcome"] == "finished"
        assert [b[1:] for b in run.summary["batch_history"]] == [[4, 1], [2, 2]]
        assert any(e["event"] == "decision" and e.get("diagnosis") == "peak" for e in run.history)
        final = run.final()
        difference = max_abs_difference(final, reference)
        print(f"shrunk run vs unshrunk: max abs difference {difference:.3g} after {ITERS} steps")  # for the record
        assert difference <= 1e-5
        assert not bitwise_equal(final, reference)  # the steps after the shrink really ran at 2x2

    def test_sigkill_mid_run_resumes_bitwise_equal(self, tiny: Tiny, reference: dict[str, Any], config_file: Any,
                                                   tmp_path: Path, spawn: Any) -> None:
        run = start(config_file, tmp_path, spawn, job(tiny, tmp_path, "2GiB"))
        victim = self._kill_after_checkpoint(run, 10)
        run.wait()
        assert run.code == 0 and run.summary["outcome"] == "finished"
        spawns, exits = ([e for e in run.history if e["event"] == kind] for kind in ("spawn", "exit"))
        assert spawns[0]["pid"] == victim and exits[0]["code"] == -signal.SIGKILL
        assert run.summary["restarts"] == 1
        assert bitwise_equal(run.final(), reference)

    def test_validation_longer_than_hang_timeout_is_not_taken_for_a_hang(self, tiny: Tiny, config_file: Any,
                                                                         tmp_path: Path, spawn: Any) -> None:
        from worker.mlx_lm.tiny import write_data

        write_data(tmp_path / "data", seed=0, valid=600)  # 150 validation batches: 2-3 s on an idle machine
        spec = {**job(tiny, tmp_path, "2GiB"), "hang_timeout": 2.0}
        spec["mlx_lm"] = {**spec["mlx_lm"], "data": str(tmp_path / "data"), "iters": 2, "val_batches": -1}
        run = start(config_file, tmp_path, spawn, spec).wait()
        assert run.code == 0 and run.summary["outcome"] == "finished" and run.summary["restarts"] == 0
        # Each step waited on a whole validation (before the first, after the last): telemetry paused for longer
        # than hang_timeout, and the worker was not killed.
        assert [r["step"] for r in run.telemetry] == [1, 2]
        assert max(r["step_seconds"] for r in run.telemetry) > 2.0, run.telemetry

    @staticmethod
    def _kill_after_checkpoint(run: Run, step: int) -> int:
        """SIGKILL the worker's group once a checkpoint at ``step`` or later is on disk; return its pid."""
        deadline = time.monotonic() + 120
        while (latest_step(run.checkpoints) or 0) < step:
            assert time.monotonic() < deadline and run.process.poll() is None, "no checkpoint before the deadline"
            time.sleep(0.02)
        (worker,) = [p for p in psutil.Process(run.process.pid).children() if "worker.mlx_lm" in p.cmdline()]
        os.killpg(worker.pid, signal.SIGKILL)
        return worker.pid

    @staticmethod
    def _check_adapters_load_in_mlx_lm(tiny: Tiny, adapters: Path, tmp_path: Path) -> None:
        """mlx_lm's generate and fuse take the adapter directory as it is."""
        names = sorted(p.name for p in adapters.iterdir())
        assert names == ["0000010_adapters.safetensors", "0000020_adapters.safetensors",
                         "0000030_adapters.safetensors", "adapter_config.json", "adapters.safetensors"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        generate = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny[0]),
                                   "--adapter-path", str(adapters), "--prompt", "the cat", "--max-tokens", "4"],
                                  capture_output=True, text=True, timeout=120, env=env)
        assert generate.returncode == 0, generate.stderr[-2000:]
        fused = tmp_path / "fused"
        fuse = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny[0]), "--adapter-path",
                               str(adapters), "--save-path", str(fused)], capture_output=True, text=True,
                              timeout=120, env=env)
        assert fuse.returncode == 0, fuse.stderr[-2000:]
        from mlx_lm import load

        with offline_env():
            adapted, _ = load(str(tiny[0]), adapter_path=str(adapters))
            merged, _ = load(str(fused))
            base, _ = load(str(tiny[0]))
        tokens = mx.array([[4, 5, 6, 7, 8, 9]])
        assert mx.allclose(adapted(tokens), merged(tokens), atol=1e-4).item()
        assert not mx.allclose(adapted(tokens), base(tokens), atol=1e-4).item()  # the adapters did something
