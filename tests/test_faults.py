"""The fault campaign (quick version) end to end, and minimal reproductions of what the campaign found."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import parse_config
from supervisor.daemon.loop import Daemon
from supervisor.daemon.rundir import RunDirError, prepare_run_dir
from supervisor.daemon.system import RealProcess
from tests.faults.process_faults import NS_LAST_PID, RacyPopen

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_campaign_survives_every_fault(tmp_path: Path) -> None:
    """`python -m tests.faults --quick`: every fault that ran was survived, nothing lost, nothing orphaned."""
    out = tmp_path / "summary.json"
    env = {**os.environ, "MLXSUP_TEST_MARK": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=540)  # about 90 s alone; much more on a loaded machine
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    text = output.decode(errors="replace")
    assert out.exists(), text[-3000:]
    summary = json.loads(out.read_text())
    rows: dict[str, dict[str, Any]] = {row["fault"]: row for row in summary["faults"]}
    assert rows["worker SIGKILL"]["count"] >= 10 and rows["daemon SIGKILL"]["count"] >= 3, text[-3000:]
    assert "during a checkpoint write" in rows["worker SIGKILL"]["notes"]
    assert rows["roles: every command x every role"]["count"] == 3 * 15  # every role x every command
    assert rows["audit: every state-changing request once"]["count"] >= 45
    assert rows["revoked event subscriber"]["count"] == 1
    for name, row in rows.items():
        if row["count"] == 0 and row["notes"].startswith("skipped"):
            continue
        assert row["count"] > 0 and row["survived"] == row["count"], f"{name}: {row}"
        assert row["checkpoints_lost"] == 0 and row["orphans"] == 0, f"{name}: {row}"
    assert summary["fuzz_frames"] >= 5000
    assert summary["daemon_alive"] is True
    assert summary["final_weights_equal"] is True
    assert proc.returncode == 0, text[-3000:]


def test_second_daemon_on_the_same_run_dir_is_refused() -> None:
    """Reproduction: the run-dir lock must be held for the daemon's whole life, not dropped at bind time."""
    run_dir = Path(tempfile.mkdtemp(prefix="mlxsup-f-", dir="/tmp"))
    config = parse_config({"daemon": {"run_dir": str(run_dir), "state_dir": str(run_dir / "state")}},
                          run_dir / "mlxsup.toml")
    first = Daemon(config, job_names=[])
    try:
        with pytest.raises(RunDirError, match="already running"):
            second = Daemon(config, job_names=[])
            second.close()
    finally:
        first.close()
        shutil.rmtree(run_dir, ignore_errors=True)


def test_symlinked_run_dir_is_refused(tmp_path: Path) -> None:
    """Reproduction: a planted symlink must not make the daemon chmod and fill a directory it points to."""
    target = tmp_path / "target"
    target.mkdir()
    os.chmod(target, 0o755)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(RunDirError):
        prepare_run_dir(tmp_path / "link")
    assert target.stat().st_mode & 0o777 == 0o755


@pytest.mark.linux_only("forces a pid through /proc/sys/kernel/ns_last_pid")
@pytest.mark.skipif(not os.access(NS_LAST_PID, os.W_OK), reason="needs a writable /proc/sys/kernel/ns_last_pid")
def test_group_sweep_never_reaches_a_recycled_pid() -> None:
    """Reproduction: a pid recycled between reaping the leader and sweeping its group must not be killed."""
    racy = RacyPopen([sys.executable, "-c", "pass"], start_new_session=True)
    worker = RealProcess(racy)
    try:
        deadline = time.monotonic() + 10
        while worker.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        stranger = racy.stranger
        if stranger is None:
            pytest.skip("could not force the pid onto a new process")
        time.sleep(0.3)
        assert stranger.poll() is None, "RealProcess.poll() SIGKILLed a process that merely reused the pid"
    finally:
        if racy.stranger is not None:
            racy.stranger.kill()
            racy.stranger.wait(timeout=5)
