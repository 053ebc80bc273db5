"""End to end: a worker's last frames (held steps, checkpoint_saved, goodbye) reach the daemon before its exit.

A worker that leaves sends them and exits at once; the daemon may see the exit before its socket has delivered
them. It must still record them (``supervisor.daemon.exits``): every life's goodbye and every step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.daemon.history import read_history
from supervisor.daemon.recorder import read_records
from tests.conftest import ROOT, run_to_end

pytestmark = pytest.mark.slow

LIVES, PER_LIFE = 40, 6


@pytest.mark.timeout(600)  # about a second a life alone; a loaded 2-core machine takes several times that
def test_every_short_life_ends_with_its_goodbye_and_last_step_recorded(config_file: Any, tmp_path: Path) -> None:
    steps = LIVES * PER_LIFE
    worker = ROOT / "tests" / "workers" / "short_lives.py"
    path = config_file({"j": {"command": [sys.executable, str(worker), str(steps), str(PER_LIFE)],
                              "checkpoint_every": 0, "keep_checkpoints": 2, "budget": "2GiB",
                              "env": {"PYTHONPATH": str(ROOT)}}}, heartbeat_interval=0.2)
    done, summary = run_to_end(path, "j", tmp_path / "s.json", timeout=580)
    assert done.returncode == 0 and summary["outcome"] == "finished", done.stderr[-3000:]
    exits = [e for e in read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl") if e["event"] == "exit"]
    expected = [(75, "sigterm", PER_LIFE * life) for life in range(1, LIVES)] + [(0, "finished", steps)]
    got = [(e["code"], e.get("goodbye", ""), e.get("step")) for e in exits]
    lost = [(i + 1, g) for i, (g, want) in enumerate(zip(got, expected, strict=False)) if g != want]
    assert len(got) == LIVES and not lost, f"{len(lost)} of {len(got)} lives lost their last frames: {lost}"
    recorded = [r["step"] for r in read_records(tmp_path / "state" / "jobs" / "j" / "telemetry.jsonl")
                if r["k"] == "step"]
    assert recorded == list(range(1, steps + 1)), sorted(set(range(1, steps + 1)) - set(recorded))
