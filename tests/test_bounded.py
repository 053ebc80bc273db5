"""What the daemon keeps per restart stays the same size: bounded lists and aggregates, rotating history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import load_config
from supervisor.core.life import JobStats
from supervisor.core.recent import LAST_BATCHES, LAST_RECOVERIES, LAST_STOPS, Recent, Series
from supervisor.daemon.history import History, read_history, read_recent, rotated
from supervisor.daemon.server import DaemonService


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing is spawned here."""


class TestRecent:
    """A list that keeps its last N items and counts them all."""

    def test_keeps_the_last_n_in_order_and_counts_every_append(self) -> None:
        recent: Recent[int] = Recent(3)
        for value in range(10):
            recent.append(value)
        assert recent == [7, 8, 9] and recent.total == 10
        assert json.loads(json.dumps(recent)) == [7, 8, 9]

    def test_a_limit_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="limit 0"):
            Recent(0)

    def test_series_median_is_over_the_recent_values_and_max_over_all(self) -> None:
        series = Series(limit=5)
        for value in [100.0, 1.0, 2.0, 3.0, 4.0, 5.0]:
            series.append(value)
        assert list(series) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert series.median() == 3.0 and series.max == 100.0 and series.total == 6
        assert Series().median() is None and Series().max is None

    def test_job_stats_lists_stop_growing_after_a_long_run(self) -> None:
        stats = JobStats()
        for index in range(20_000):
            stats.recoveries.append(index / 1000)
            stats.stop_steps.append([index, index])
            stats.batch_history.append([index, 8, 1])
        assert len(stats.recoveries) == LAST_RECOVERIES and stats.recoveries.total == 20_000
        assert stats.recoveries.max == 19.999
        assert len(stats.stop_steps) == LAST_STOPS and stats.stop_steps[-1] == [19_999, 19_999]
        assert len(stats.batch_history) == LAST_BATCHES and stats.batch_history.total == 20_000


def fill(history: History, count: int, start: int = 0) -> None:
    for index in range(start, start + count):
        history.record("state", n=index, pad="x" * 40)


class TestHistoryFiles:
    """history.jsonl rotates, is read from its end at start, and read back across rotated files."""

    def test_it_rotates_past_max_bytes_and_keeps_log_keep_old_files(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        history = History(path, limit=10, max_bytes=4096, keep=2)
        fill(history, 2000)
        assert [p.name for p in rotated(path)] == ["history.jsonl", "history.jsonl.1", "history.jsonl.2"]
        assert not (tmp_path / "history.jsonl.3").exists()
        assert all(p.stat().st_size < 4096 + 200 for p in rotated(path))
        assert [e["n"] for e in history.events] == list(range(1990, 2000))  # memory: the last `limit`

    def test_a_new_daemon_reads_the_last_events_across_a_rotation(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        fill(History(path, limit=10, max_bytes=16384, keep=3), 500)
        fill(History(path, limit=10, max_bytes=16384, keep=3), 1, start=500)  # just after a rotation, or not
        again = History(path, limit=300, max_bytes=16384, keep=3)
        assert len(rotated(path)) >= 2
        assert [e["n"] for e in again.events] == list(range(201, 501))

    def test_asking_for_more_than_memory_reads_the_rotated_files(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        history = History(path, limit=20, max_bytes=8192, keep=3)
        fill(history, 400)
        on_disk = [e["n"] for e in read_history(path)]  # every event the kept files still hold
        assert on_disk == list(range(on_disk[0], 400)) and len(on_disk) > 100
        assert [e["n"] for e in history.recent(100)] == list(range(300, 400))
        assert [e["n"] for e in history.recent(5)] == list(range(395, 400))
        assert [e["n"] for e in history.recent(1_000_000)] == on_disk  # capped, and no more than is kept

    def test_torn_and_foreign_lines_are_skipped_from_the_end(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        path.write_text('{"event":"a","n":1}\nnot json\n[1,2]\n{"event":"b","n":2}\n{"event":"c","n"')
        assert [e["n"] for e in read_recent(path, 10)] == [1, 2]

    def test_lines_longer_than_a_read_chunk_come_back_whole(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        history = History(path, limit=5)
        for index in range(5):
            history.record("big", n=index, pad="y" * 150_000)
        assert [e["n"] for e in read_recent(path, 3)] == [2, 3, 4]

    @pytest.mark.linux_only("reads /proc/self/io (macOS has no /proc)")
    def test_start_reads_the_tail_only_however_long_the_history(self, tmp_path: Path) -> None:
        path = tmp_path / "history.jsonl"
        with open(path, "w") as handle:
            line = json.dumps({"event": "state", "pad": "z" * 200}) + "\n"
            handle.write(line * 200_000)  # about 45 MB of old events
        before = _bytes_read()
        history = History(path, limit=1000)
        read = _bytes_read() - before
        assert len(history.events) == 1000
        assert read < 2 * 2**20, f"read {read} bytes of a {path.stat().st_size}-byte history to load 1000 events"


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


class TestRemovedJobs:
    """A job removed from the config leaves nothing behind in the daemon (a config edited for months)."""

    def test_a_removed_job_leaves_the_worker_identity_map(self, config_file: Any) -> None:
        """A real DaemonService (sockets bound, loop not running): the identity its worker's hello left in the
        daemon's map (put there as ``_on_hello`` does) goes with the job once a reload removes it; before, the
        map kept every removed job (its history, telemetry and stats) alive for the daemon's whole life."""
        path = config_file({"keep": {"autostart": False}, "gone": {"autostart": False}})
        svc = DaemonService(load_config(path))
        try:
            daemon = svc.daemon
            gone, keep = daemon.jobs["gone"], daemon.jobs["keep"]
            daemon.by_identity.update({b"worker-of-gone": gone, b"worker-of-keep": keep})
            config_file({"keep": {"autostart": False}})
            assert svc.update()["removed"] == ["gone"]
            svc.on_turn(daemon, daemon.system.now())
            assert "gone" not in daemon.jobs
            assert daemon.by_identity == {b"worker-of-keep": keep}
        finally:
            svc.close()
