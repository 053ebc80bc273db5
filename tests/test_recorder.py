"""Telemetry recording: lines wait in memory and reach the file on the flush timer, when many wait, and at close."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import ANY

from supervisor.daemon.recorder import Recorder, expand_steps, read_records


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


class TestBuffering:
    """When the recorder writes, and that nothing is lost on the way."""

    def test_records_wait_for_the_flush_interval(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path, flush_every=3600.0)
        recorder.record("step", step=1)  # the first record finds the last flush long past: written at once
        for step in range(2, 50):
            recorder.record("step", step=step)
        recorder.flush_due()  # not due yet
        assert len(lines(path)) == 1
        recorder.close()
        assert [r["step"] for r in read_records(path)] == list(range(1, 50))

    def test_the_loop_timer_flushes_when_due(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path, flush_every=0.0)
        recorder._last_flush = float("inf")  # as if just flushed: records alone do not flush
        for step in range(5):
            recorder.record("sample", bytes=step)
        assert lines(path) == []
        recorder._last_flush = 0.0
        recorder.flush_due()
        assert [r["bytes"] for r in read_records(path)] == list(range(5))
        recorder.close()

    def test_a_full_buffer_is_written_at_once(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path, flush_every=3600.0, max_pending=10)
        recorder.record("step", step=0)
        for step in range(1, 25):
            recorder.record("step", step=step)
        assert len(lines(path)) == 21  # the first record, then two full buffers of 10
        recorder.close()
        assert len(lines(path)) == 25

    def test_every_line_carries_time_and_kind(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path)
        recorder.record("step", step=7, loss=1.5)
        recorder.close()
        (record,) = read_records(path)
        assert record["k"] == "step" and record["step"] == 7 and record["loss"] == 1.5 and record["t"] > 0

    def test_a_failed_write_is_reported_and_the_next_flush_writes_again(self, tmp_path: Path) -> None:
        errors: list[str] = []
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        recorder = Recorder(blocker / "telemetry.jsonl", flush_every=0.0,
                            on_error=lambda kind, exc: errors.append(kind))
        recorder.record("step", step=1)
        assert errors == ["telemetry"]
        blocker.unlink()
        recorder.record("step", step=2)
        recorder.close()
        assert [r["step"] for r in read_records(blocker / "telemetry.jsonl")] == [2]


class TestStepsLines:
    """A ``steps`` line (the rows of one ``steps`` frame) reads back as one ``step`` record per row."""

    def test_rows_come_back_as_step_records_in_order(self, tmp_path: Path) -> None:
        path = tmp_path / "telemetry.jsonl"
        recorder = Recorder(path)
        recorder.record("step", step=1, loss=2.0)
        recorder.record("steps", step=(2, 3), loss=(1.5, 1.25), val_loss=(None, 1.0), transient=7, rank=1)
        recorder.record("sample", bytes=5)
        recorder.close()
        assert read_records(path) == [
            {"t": ANY, "k": "step", "step": 1, "loss": 2.0},
            {"t": ANY, "k": "step", "step": 2, "loss": 1.5, "transient": 7, "rank": 1},
            {"t": ANY, "k": "step", "step": 3, "loss": 1.25, "val_loss": 1.0, "transient": 7, "rank": 1},
            {"t": ANY, "k": "sample", "bytes": 5}]

    def test_a_damaged_steps_line_gives_nothing(self) -> None:
        assert expand_steps({"k": "steps", "step": [1, 2], "loss": [1.0]}) == []
        assert expand_steps({"k": "steps", "step": 3}) == []
