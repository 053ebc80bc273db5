"""Holding step telemetry: calm steps wait (bounded in time and count), anything near the bands goes at once with
what was held before it, in order. Pure bookkeeping with an injected clock; the socket-level behaviour is
tested in tests/test_supervise.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from protocol import MAX_MESSAGE_BYTES, Goodbye, Heartbeat, Step, Steps, decode
from protocol.messages import MAX_STEPS_ROWS
from supervisor.core.policy import Estimator, Limits, PolicyConfig, hold_horizon, hold_threshold
from worker.hold import StepHold, batch_frames

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def allowed(clock: Clock, below: int = 1000 * MiB, hold: float = 0.25, max_held: int = 1000) -> StepHold:
    h = StepHold(clock, max_held=max_held)
    h.configure(hold, below, 6)
    h.step(b"first", 1, 100 * MiB, 0)  # the first step of a process always goes at once
    return h


class TestHolding:
    """When a step waits and when it goes."""

    def test_without_the_daemons_word_every_step_goes_at_once(self) -> None:
        h = StepHold(Clock())
        assert [h.step(bytes([i]), i, 100 * MiB, 0) for i in range(1, 4)] == [[b"\x01"], [b"\x02"], [b"\x03"]]
        h.configure(None, None, None)  # a heartbeat without the hold fields
        assert h.step(b"x", 4, 100 * MiB, 0) == [b"x"]

    def test_calm_steps_wait_until_the_oldest_has_waited_hold_seconds(self) -> None:
        clock = Clock()
        h = allowed(clock)
        for step in range(2, 6):
            clock.now += 0.05
            assert h.step(f"s{step}".encode(), step, 100 * MiB, 0) == []
        assert not h.due()
        clock.now += 0.25
        assert h.due()
        assert h.step(b"s6", 6, 100 * MiB, 0) == [b"s2", b"s3", b"s4", b"s5", b"s6"]

    def test_a_step_near_the_band_goes_at_once_after_the_held_ones(self) -> None:
        clock = Clock()
        h = allowed(clock, below=500 * MiB)
        assert h.step(b"calm", 2, 100 * MiB, 0) == []
        assert h.step(b"hot", 3, 450 * MiB, 60 * MiB) == [b"calm", b"hot"]  # footprint + transient >= below

    def test_a_trend_that_reaches_the_band_within_the_horizon_is_not_calm(self) -> None:
        h = allowed(Clock(), below=500 * MiB)
        assert h.step(b"a", 2, 200 * MiB, 0) == [b"a"]  # +100 MiB/step from step 1: 200 + 6 x 100 >= 500
        h2 = allowed(Clock(), below=500 * MiB)
        assert h2.step(b"a", 2, 140 * MiB, 0) == []  # +40 MiB/step: 140 + 6 x 40 < 500

    def test_a_command_stops_holding_until_the_next_heartbeat(self) -> None:
        clock = Clock()
        h = allowed(clock)
        assert h.step(b"a", 2, 100 * MiB, 0) == []
        h.stop_holding()
        assert h.due()
        assert h.step(b"b", 3, 100 * MiB, 0) == [b"a", b"b"]
        h.configure(0.25, 1000 * MiB, 6)
        assert h.step(b"c", 4, 100 * MiB, 0) == []

    def test_a_heartbeat_that_lowers_hold_below_makes_the_held_steps_due_at_once(self) -> None:
        clock = Clock()
        h = allowed(clock, below=1000 * MiB)
        assert h.step(b"s2", 2, 100 * MiB, 0) == []
        h.configure(0.25, 2000 * MiB, 6)  # a wider permission: they keep waiting
        assert not h.due()
        h.configure(0.25, 900 * MiB, 6)  # a narrower one: out at the worker's next look at its socket
        assert h.due()
        assert h.release() == [b"s2"]
        assert h.step(b"s3", 3, 100 * MiB, 0) == []  # still calm under the new hold_below: held again
        assert not h.due()

    def test_a_heartbeat_without_the_hold_fields_makes_the_held_steps_due_at_once(self) -> None:
        h = allowed(Clock())
        assert h.step(b"s2", 2, 100 * MiB, 0) == []
        h.configure(None, None, None)
        assert h.due()
        assert h.step(b"s3", 3, 100 * MiB, 0) == [b"s2", b"s3"]

    def test_at_most_max_held_frames_wait(self) -> None:
        h = allowed(Clock(), max_held=3)
        assert [h.step(b"x", s, 100 * MiB, 0) for s in range(2, 5)] == [[], [], []]
        assert h.step(b"y", 5, 100 * MiB, 0) == [b"x", b"x", b"x", b"y"]

    def test_release_puts_the_held_steps_before_another_frame(self) -> None:
        h = allowed(Clock())
        h.step(b"s2", 2, 100 * MiB, 0)
        assert h.release(b"goodbye") == [b"s2", b"goodbye"]
        assert h.release() == []


def step_message(step: int) -> Step:
    return Step(step, 8, 1, 1.5, 0.02, 100 * MiB, 0, 120 * MiB, 100 * MiB + step)


class TestBatchFrames:
    """How held steps become frames: ``steps`` frames of at most ``rows`` rows when the daemon allows them."""

    def test_a_run_of_steps_is_one_steps_frame_with_every_row_in_order(self) -> None:
        held = [step_message(s) for s in range(2, 7)]
        (frame,) = batch_frames(held, 256)
        message = decode(frame)
        assert isinstance(message, Steps) and message.rows() == held

    def test_runs_are_cut_at_rows_and_a_run_of_one_stays_a_step_frame(self) -> None:
        held = [step_message(s) for s in range(1, 6)]
        frames = [decode(f) for f in batch_frames(held, 2)]
        assert [type(m).__name__ for m in frames] == ["Steps", "Steps", "Step"]
        assert [r.step for m in frames for r in (m.rows() if isinstance(m, Steps) else [m])] == [1, 2, 3, 4, 5]

    def test_without_rows_every_step_is_its_own_frame(self) -> None:
        held = [step_message(s) for s in range(1, 4)]
        assert [decode(f) for f in batch_frames(held, 0)] == held

    def test_other_messages_end_a_run_and_keep_their_place(self) -> None:
        bye = Goodbye("finished", 4)
        frames = [decode(f) for f in batch_frames([step_message(2), step_message(3), bye, step_message(5)], 256)]
        assert isinstance(frames[0], Steps) and [r.step for r in frames[0].rows()] == [2, 3]
        assert frames[1:] == [bye, step_message(5)]

    def test_the_largest_frame_fits_the_message_limit(self) -> None:
        held = [Step(2**40 + s, 2**20, 2**10, 1e300, 1e300, 2**62, 2**62, 2**62, 2**62, 1e300, 1e300)
                for s in range(MAX_STEPS_ROWS)]
        (frame,) = batch_frames(held, MAX_STEPS_ROWS)
        assert len(frame) <= MAX_MESSAGE_BYTES and decode(frame).rows() == held  # type: ignore[union-attr]


class TestDaemonSide:
    """What the daemon tells the worker."""

    def test_threshold_is_as_far_below_warn_as_warn_is_below_budget_less_the_rest_of_the_group(self) -> None:
        limits = Limits(warn=850 * MiB, budget=1000 * MiB, kill=1100 * MiB)
        assert hold_threshold(limits, sampled=300 * MiB, reported=300 * MiB) == 700 * MiB
        assert hold_threshold(limits, sampled=400 * MiB, reported=300 * MiB) == 600 * MiB  # a child holds 100
        assert hold_threshold(limits, sampled=2000 * MiB, reported=100 * MiB) == 0
        slow, fast = Estimator(PolicyConfig(checkpoint_steps=2)), Estimator(PolicyConfig(checkpoint_steps=2))
        for step in range(1, 10):
            slow.observe_step(step, 100 * MiB, 0, 1.0)
            fast.observe_step(step, 100 * MiB, 0, 0.02)
        assert hold_horizon(slow) == 2 * (2 + 1)  # the checkpoint's steps, and the command one step late
        assert hold_horizon(fast) == 2 * (2 + 5)  # 0.1 s of reaction is 5 steps of 20 ms

    def test_the_hold_fields_are_optional_on_the_wire(self) -> None:
        from protocol import decode, encode

        assert decode(encode(Heartbeat(1.0))) == Heartbeat(1.0)
        assert b"hold" not in encode(Heartbeat(1.0))
        assert decode(encode(Heartbeat(1.0, None, 0.25, 5, 6))) == Heartbeat(1.0, None, 0.25, 5, 6)


class TestSessionHolding:
    """A real Session over a real socket: held steps arrive together, in order, and none is lost."""

    @staticmethod
    def frames_received(router: Any, wait_ms: int) -> list[list[int]]:
        """The steps of each step or steps frame received, a list per frame."""
        got: list[list[int]] = []
        while router.poll(wait_ms):
            message = decode(router.recv_multipart()[1])
            if isinstance(message, Step):
                got.append([message.step])
            elif isinstance(message, Steps):
                got.append(list(message.step))
            wait_ms = 50
        return got

    @pytest.mark.parametrize("rows", [None, MAX_STEPS_ROWS], ids=["step_frames", "steps_frames"])
    def test_calm_steps_wait_until_an_urgent_step_the_pulse_or_close(self, tmp_path: Path, rows: int | None) -> None:
        """Without ``hold_rows`` (a version 1 daemon) each held step is its own frame; with it, the steps sent
        together are one ``steps`` frame."""
        import zmq

        from protocol import encode
        from worker.session import Session, SessionSettings

        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tmp_path / 'w.sock'}"
        router.bind(endpoint)
        session = Session(SessionSettings(endpoint=endpoint, token="t" * 32, orphan_timeout=60), 100, batch=8)
        def tell(hold: float, below: int) -> None:
            """A daemon heartbeat with the hold fields; returns once the session's pulse thread has read it."""
            router.send_multipart([identity, encode(Heartbeat(time.time(), None, hold, below, 6, rows))])
            deadline = time.monotonic() + 10
            while (session._hold.hold, session._hold.below) != (hold, below) and time.monotonic() < deadline:
                time.sleep(0.01)

        def together(*steps: int) -> list[list[int]]:
            """The frames that ``steps`` sent at once arrive in."""
            return [list(steps)] if rows else [[step] for step in steps]

        try:
            session.end_step(1, 1.0)
            identity = router.recv_multipart()[0]  # the hello
            assert self.frames_received(router, 2000) == [[1]]
            tell(30.0, 1 << 50)
            for step in range(2, 6):
                session.end_step(step, 1.0)
            assert self.frames_received(router, 600) == []  # held: calm, and 30 s allowed
            tell(30.0, 1)  # now every footprint is near the band: the held steps go out at once (the pulse)
            assert self.frames_received(router, 2000) == together(2, 3, 4, 5)
            session.end_step(6, 1.0)
            assert self.frames_received(router, 2000) == [[6]]  # not calm: at once
            tell(0.3, 1 << 50)
            session.end_step(7, 1.0)
            session.end_step(8, 1.0)
            assert self.frames_received(router, 3000) == together(7, 8)  # the pulse thread sent them after 0.3 s
            session.end_step(9, 1.0)
            session.end_step(10, 1.0)
        finally:
            session.close()
        assert self.frames_received(router, 2000) == together(9, 10)  # close sends what was held
        router.close(linger=0)
        context.term()


    def test_a_step_whose_mlx_active_is_nil_counts_no_transient(self, tmp_path: Path) -> None:
        """PROTOCOL.md, "Holding, exactly": when ``mlx_active`` is nil the transient counts as 0, not as the
        whole ``mlx_peak``: a step with a huge peak but no active figure is still calm, so it is held."""
        import zmq

        from protocol import encode
        from worker.session import Session, SessionSettings

        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{tmp_path / 'w.sock'}"
        router.bind(endpoint)
        session = Session(SessionSettings(endpoint=endpoint, token="t" * 32, orphan_timeout=60), 100, batch=8)
        below = 1 << 40  # far above this process's footprint
        try:
            session.end_step(1, 1.0)
            identity = router.recv_multipart()[0]  # the hello
            assert self.frames_received(router, 2000) == [[1]]
            router.send_multipart([identity, encode(Heartbeat(time.time(), None, 30.0, below, 6))])
            deadline = time.monotonic() + 10
            while session._hold.below != below and time.monotonic() < deadline:
                time.sleep(0.01)
            footprint = 100 * MiB
            session._send(Step(2, 8, 1, 1.0, 0.01, None, None, 2 * below, footprint))  # peak over, active nil
            assert self.frames_received(router, 600) == []  # calm: held
            session._send(Step(3, 8, 1, 1.0, 0.01, below, None, 2 * below, footprint))  # peak - active = below
            assert self.frames_received(router, 2000) == [[2], [3]]  # not calm: at once, the held one first
        finally:
            session.close()
            router.close(linger=0)
            context.term()


class TestJobHeartbeat:
    """The daemon's heartbeat for a job (a Job on a fake OS): no holding until the estimator has a level of
    this life, then a threshold that leaves room for the rest of the process group."""

    def test_hold_fields_follow_the_life_and_the_group(self, tmp_path: Path) -> None:
        from tests.test_job_fake import Harness

        h = Harness(tmp_path, hang_timeout=60.0)
        assert h.job.heartbeat(1.0, 0.25) == Heartbeat(1.0)  # no step yet
        for step in range(1, 6):  # past the estimator's warm-up
            h.step(step, footprint=300 * MiB)
        h.sample(400 * MiB)  # the group holds 100 MiB more than the worker itself
        # Horizon: 2 x (2 checkpoint steps + 10 steps of 10 ms in the daemon's 0.1 s reaction).
        assert h.job.heartbeat(1.0, 0.25) == Heartbeat(1.0, None, 0.25, 850 * MiB - 150 * MiB - 100 * MiB, 24,
                                                        MAX_STEPS_ROWS)  # held steps may come as steps frames
        assert h.job.heartbeat(1.0, 0.0) == Heartbeat(1.0)  # telemetry_hold = 0: never

    def test_hold_is_at_most_a_quarter_of_the_hang_timeout(self, tmp_path: Path) -> None:
        from tests.test_job_fake import Harness

        h = Harness(tmp_path, hang_timeout=0.4)
        for step in range(1, 6):
            h.step(step)
        h.sample(100 * MiB)
        assert h.job.heartbeat(1.0, 0.25).hold == 0.1
