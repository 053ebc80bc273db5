"""An mlx-lm LoRA gang of 2 ranks on MLX's MPI backend (Debian's Open MPI) under the daemon: mlx-lm's trainer and
the gang's collectives run over MPI, a leak on rank 1 stops both ranks at one step, and the end is bitwise equal to
the ring reference of tests/test_mlx_lm_gang.py (a sum of two floats does not depend on its order)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon.history import read_history
from tests.conftest import mlxsupd
from tests.gangs import free_port_base
from tests.test_gang_mpi import _mpi_missing, wait_gone
from tests.test_mlx_lm_gang import ITERS, check_files, check_stops, lora_job, reference, tiny  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400), pytest.mark.linux_only("Open MPI 4.1 tested on Linux"),
              pytest.mark.skipif(bool(_mpi_missing()), reason=_mpi_missing() or "-")]


def test_an_mlx_lm_gang_over_mpi_stops_at_one_step_and_resumes_bitwise(
        tiny: Any, reference: Path, config_file: Any, tmp_path: Path, run_dir: Path, spawn: Any) -> None:  # noqa: F811
    job = lora_job(tiny, tmp_path / "adapters", backend="mpi", gang={"port": free_port_base()})
    summary = tmp_path / "summary.json"
    daemon = spawn(mlxsupd("run", "-c", str(config_file({"j": job})), "j", "--summary", str(summary),
                           "--log-format", "json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = daemon.communicate(timeout=300)
    assert summary.exists(), stderr.decode()[-3000:]
    result = json.loads(summary.read_text())
    assert daemon.returncode == 0 and result["outcome"] == "finished", result
    assert result["steps_completed"] == ITERS and result["restarts"] >= 1
    job_dir = tmp_path / "state" / "jobs" / "j"
    check_stops(read_history(job_dir / "history.jsonl"))
    check_files(job_dir / "checkpoints", tmp_path / "adapters", reference)
    assert wait_gone(run_dir) == []
