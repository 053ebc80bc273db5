"""`mlxsupctl diagnose`, `explain`, `status` and `top` on a running daemon: real daemon, real SDK and guard-only
workers, real sockets."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from supervisor.cli.live import top_frame
from tests.conftest import ROOT
from tests.test_daemon import Daemon

pytestmark = pytest.mark.slow
SHAPES = str(ROOT / "tests" / "workers" / "leak_shapes.py")
PLAIN = str(ROOT / "tests" / "workers" / "plain_leak.py")


@pytest.fixture
def leaking(spawn: Any, config_file: Any, tmp_path: Any) -> Any:
    """A daemon running an SDK loop that keeps an array per step in a dict, and a guard-only command."""
    path = config_file({
        "sdk": {"command": [sys.executable, SHAPES, "dict", "100000", "--kib", "64", "--seconds", "0.01"],
                "budget": "3GiB", "leak_threshold": "16KiB", "checkpoint_every": 0},
        "guard": {"command": [sys.executable, PLAIN, "100000", "1", "--seconds", "0.05"], "sdk": False,
                  "budget": "3GiB"},
    })
    daemon = Daemon(spawn, path, tmp_path)
    yield daemon
    daemon.stop()


def explain(daemon: Daemon, job: str) -> dict[str, Any]:
    return daemon.json("explain", job)  # type: ignore[no-any-return]


class TestDiagnose:
    """diagnose asks for a census; explain says what leaks and names the holder; status and top show it."""

    def test_a_census_names_the_dict_and_explain_says_it_in_words(self, leaking: Daemon) -> None:
        d = leaking
        d.wait(lambda: explain(d, "sdk")["leak"]["verdict"] == "arrays_retained", 90, "a verdict on the SDK job")
        asked = d.json("diagnose", "sdk", "--steps", "10")
        assert asked["steps"] == 10 and asked["job"] == "sdk"
        d.wait(lambda: explain(d, "sdk")["census"] is not None, 60, "the census answer")
        census = explain(d, "sdk")["census"]
        holder = census["holders"][0]
        assert (holder["name"], holder["kind"], holder["items_per_step"]) == ("by_step", "dict", 1)
        assert holder["mlx_bytes_per_step"] == pytest.approx(64 * 1024, rel=0.05)
        assert census["last_step"] - census["first_step"] == 10 and census["complete"]
        text = d.ctl("explain", "sdk").stdout
        words = json.loads(text)  # --json is the Daemon helper's default; render the words directly too
        assert words["leak"]["meaning"].startswith("MLX active memory grows")
        rendered = _render("explain", words)
        assert "sdk: arrays_retained" in rendered and "Clearing the cache cannot free them" in rendered
        assert "by_step (dict, leak_shapes.py:<module>): +1 item/step, +64.0 KiB/step of MLX arrays" in rendered
        history = d.history("sdk")
        assert [e["event"] for e in history if e["event"].startswith("census")] == ["census_asked", "census"]

    def test_status_and_top_show_the_verdict(self, leaking: Daemon) -> None:
        d = leaking
        d.wait(lambda: {j["name"]: j["leak"]["verdict"] for j in d.json("status")["jobs"]}.get("sdk")
               == "arrays_retained", 90, "the SDK job's verdict in status")
        jobs = d.json("status")["jobs"]
        sdk = next(j for j in jobs if j["name"] == "sdk")
        assert sdk["leak"]["per"] == "step" and sdk["leak"]["slopes"]["active"] > 0
        frame = top_frame(jobs, {})
        assert "WHAT LEAKS" in frame.splitlines()[0]
        assert "arrays_retained" in next(line for line in frame.splitlines() if line.startswith("sdk"))

    def test_a_guard_only_job_grows_per_second_and_takes_no_census(self, leaking: Daemon) -> None:
        d = leaking
        d.wait(lambda: explain(d, "guard")["leak"].get("per") == "second"
               and explain(d, "guard")["leak"]["verdict"] == "unattributed", 90, "a per-second verdict")
        leak = explain(d, "guard")["leak"]
        assert leak["slopes"]["footprint"] == pytest.approx(20 * 2**20, rel=0.5)  # 1 MiB every 0.05 s
        refused = d.ctl("diagnose", "guard")
        assert refused.returncode == 1 and "does not take censuses" in refused.stderr
        bad = d.ctl("diagnose", "sdk", "--steps", "0")
        assert bad.returncode == 1 and "steps must be 1.." in bad.stderr


def _render(name: str, result: Any) -> str:
    from supervisor.control.commands import REGISTRY

    return REGISTRY[name].render(result)
