"""Leak forensics end to end: real `mlxsupd run`, real SDK workers (tests/workers/leak_shapes.py) that leak in one
way each; the verdict names the kind of memory that grows, and the census (diagnose_on_leak) names its holder."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from supervisor.daemon.history import read_history
from tests.conftest import ROOT, run_to_end

pytestmark = pytest.mark.slow
SCRIPT = str(ROOT / "tests" / "workers" / "leak_shapes.py")
STEPS = 200


def run_shape(config_file: Any, tmp_path: Path, shape: str, steps: int = STEPS, **job: Any) -> dict[str, Any]:
    """Run the script of one shape under a roomy budget (no breach: only the diagnosis speaks); its summary."""
    extra = job.pop("args", [])
    config = config_file({"j": {"command": [sys.executable, SCRIPT, shape, str(steps), *extra], "budget": "4GiB",
                                "leak_threshold": "256KiB", "diagnose_on_leak": True, "checkpoint_every": 0,
                                "working_dir": str(ROOT), **job}})
    done, summary = run_to_end(config, "j", tmp_path / "summary.json", timeout=300)
    assert summary["outcome"] == "finished", done.stderr[-3000:]
    return summary


def culprit(summary: dict[str, Any]) -> dict[str, Any]:
    assert summary["censuses"], "no census was taken"
    holders = summary["censuses"][0]["holders"]
    assert holders, "the census found nothing that grew"
    return holders[0]  # type: ignore[no-any-return]


class TestVerdicts:
    """Each shape of leak gets its verdict, and the census names the holder."""

    def test_arrays_kept_in_a_list(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "list")
        overall = summary["leak"]["overall"]
        assert overall["verdict"] == "arrays_retained", overall
        assert overall["slopes"]["active"] == pytest.approx(512 * 1024, rel=0.1)
        low, high = overall["interval"]["active"]
        assert low <= overall["slopes"]["active"] <= high
        holder = culprit(summary)
        assert (holder["name"], holder["kind"]) == ("history", "list")
        assert holder["items_per_step"] == 1
        assert holder["mlx_bytes_per_step"] == pytest.approx(512 * 1024, rel=0.02)
        assert holder["contents"] == "tuple(dict[str, array], array)"
        assert holder["text"].startswith("history (list, leak_shapes.py:<module>): +1 item/step, +512.0 KiB/step")

    def test_a_dict_keyed_by_step(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "dict")
        assert summary["leak"]["overall"]["verdict"] == "arrays_retained"
        holder = culprit(summary)
        assert (holder["name"], holder["kind"], holder["items_per_step"]) == ("by_step", "dict", 1)
        assert holder["contents"] == "array"

    def test_an_attribute_of_an_object(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "attr")
        assert summary["leak"]["overall"]["verdict"] == "arrays_retained"
        holder = culprit(summary)
        assert (holder["name"], holder["kind"]) == ("tracker.kept", "list")
        assert holder["mlx_bytes_per_step"] == pytest.approx(512 * 1024, rel=0.02)

    def test_a_cache_allowed_to_grow(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "cache", cache_limit="3GiB")
        overall = summary["leak"]["overall"]
        assert overall["verdict"] == "cache_growth", overall
        assert "cache_limit" in " ".join(overall["fixes"])
        holders = summary["censuses"][0]["holders"] if summary["censuses"] else []
        assert not [h for h in holders if h["mlx_bytes_per_step"] > 0]  # no name holds it: it is freed memory

    def test_a_growth_outside_mlx(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "bytes")
        assert summary["leak"]["overall"]["verdict"] == "outside_mlx", summary["leak"]["overall"]
        holder = culprit(summary)
        assert (holder["name"], holder["kind"], holder["items_per_step"]) == ("junk", "list", 1)
        assert holder["other_bytes_per_step"] == pytest.approx(512 * 1024, rel=0.02)
        assert holder["mlx_bytes_per_step"] == 0

    def test_no_leak(self, config_file: Any, tmp_path: Path) -> None:
        summary = run_shape(config_file, tmp_path, "none")
        assert summary["leak"]["overall"]["verdict"] == "none"
        assert summary["censuses"] == []  # diagnose_on_leak waits for a leak verdict
        history = read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")
        lives = [e for e in history if e["event"] == "leak"]
        assert len(lives) == 1 and lives[0]["verdict"] == "none" and lives[0]["steps"] == STEPS


class TestCensusLeavesTrainingAlone:
    """A census reads sizes only: the weights come out bit for bit the same."""

    def test_weights_are_bitwise_equal_with_and_without_a_census(self, config_file: Any, tmp_path: Path) -> None:
        weights = {}
        for census in (True, False):
            path = tmp_path / f"weights-{census}.safetensors"
            run = tmp_path / str(census)
            run.mkdir()
            summary = run_shape(lambda jobs, run=run: config_file(jobs, state_dir=str(run / "state")), run, "list", 60,
                                diagnose_on_leak=census, args=["--weights", str(path)])
            assert bool(summary["censuses"]) is census
            weights[census] = load_file(str(path))
        assert weights[True].keys() == weights[False].keys()
        for name, value in weights[True].items():
            assert value.tobytes() == weights[False][name].tobytes(), name


class TestCacheClearOnTheDemo:
    """The demo's leak (deploy/demo.toml, shortened): clear_cache releases the cache, and the growth goes on."""

    def test_each_clear_reports_its_release_and_that_growth_went_on(self, config_file: Any, tmp_path: Path) -> None:
        demo = tomllib.loads((ROOT / "deploy" / "demo.toml").read_text())["jobs"]["demo"]
        demo["train"]["steps"] = 70  # about two lives, each reaching the warn band
        path = config_file({"demo": demo}, system_floor="0")
        done, summary = run_to_end(path, "demo", tmp_path / "summary.json", timeout=400)
        assert summary["outcome"] == "finished", done.stderr[-3000:]
        clears = summary["cache_clears"]
        assert clears["sent"] >= 1 and clears["measured"] >= 1, clears
        assert clears["growth_went_on"] == clears["measured"]
        # The release is net of the next step's refill, and the demo's cache is small: 0 to a few hundred KiB (0
        # in one fresh-clone run, 160 KiB in another). That growth went on is the finding that matters here.
        assert clears["released_bytes"] >= 0
        assert all(r["released_bytes"] >= 0 for r in clears["last"]), clears
        for record in clears["last"]:
            assert record["released_of"] == "cache"
            assert record["growth_bytes_per_step"] > 40 * 2**20  # the demo leaks 50 MB/step
            assert re.fullmatch(r"clear_cache released [\d.]+ [KMG]?i?B; growth went on at [\d.]+ MiB/step",
                                record["text"]), record["text"]
            assert record["before"]["step"] < record["after"]["step"]
        assert summary["leak"]["overall"]["verdict"] == "arrays_retained"
        history = read_history(tmp_path / "state" / "jobs" / "demo" / "history.jsonl")
        assert [e["text"] for e in history if e["event"] == "cache_clear"] == [r["text"] for r in clears["last"]]
