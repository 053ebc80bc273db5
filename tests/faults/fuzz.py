"""Protocol fuzzing of a running daemon's control and worker sockets.

Control socket: every malformed request must get an error reply (counted), none may succeed. Worker socket:
frames from a peer without a valid hello are dropped without a reply and without touching the job. The daemon
must stay up (``version`` answers) with a flat resident size (RSS before and after are reported).
"""

from __future__ import annotations

import collections
import random
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
from hypothesis import HealthCheck, given, seed, settings

from tests.faults import frames as gen
from tests.faults.common import SMALL, Area, FaultResult, Workspace, start_daemon, sweep_orphans, wait_until
from tests.faults.wire import Control, WorkerPeer, answers

BATCH = 100
PACE = 200  # worker frames between 10 ms pauses
BURST = 20_000  # unpaced worker frames, to report the backlog the daemon's queues can hold
RSS_SLACK = 20 * 2**20
HARD_LIMIT = 4 * 256 * 1024  # the control ROUTER's MAXMSGSIZE: libzmq drops a peer that sends more


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def control_raw(area: Area, count: int, rng: random.Random) -> collections.Counter[str]:
    """``count`` raw malformed requests in batches; tallies replies by error code (and anything else)."""
    tally: collections.Counter[str] = collections.Counter()
    draw = gen.generator(gen.CONTROL_KINDS, rng)
    client = Control.ipc(area.run_dir)
    try:
        sent = 0
        while sent < count:
            batch = min(BATCH, count - sent)
            for _ in range(batch):
                kind, parts = draw()
                tally[f"sent {kind}"] += 1
                client.sock.send_multipart(parts)
            sent += batch
            for _ in range(batch):
                reply = client.receive(5.0)
                if reply is None:
                    tally["missing reply"] += 1
                    break
                tally["ok reply" if reply.get("ok") else f"error {reply.get('error', {}).get('code')}"] += 1
    finally:
        client.close()
    return tally


def control_hypothesis(area: Area, examples: int, seed_value: int,
                       tally: collections.Counter[str]) -> tuple[int, str]:
    """Hypothesis-generated request maps; each must get an error reply. (examples run, failure or '')."""
    client = Control.ipc(area.run_dir)
    ran = [0]

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(gen.control_requests)
    def one(body: Any) -> None:
        ran[0] += 1
        client.sock.send(gen.pack(body))
        reply = client.receive(5.0)
        assert reply is not None, f"no reply to {body!r:.200}"
        tally[str(reply.get("error", {}).get("code"))] += 1
        assert reply.get("ok") is False, f"request {body!r:.200} succeeded: {reply!r:.200}"

    try:
        one()
        return ran[0], ""
    except AssertionError as exc:
        return ran[0], str(exc)[:300]
    finally:
        client.close()


def over_hard_limit(area: Area, rng: random.Random) -> int:
    """Frames over the socket's hard limit: libzmq drops the peer (no reply); count them, then reconnect."""
    dropped = 0
    for _ in range(3):
        client = Control.ipc(area.run_dir)
        try:
            client.sock.send(rng.randbytes(HARD_LIMIT + 1024))
            dropped += client.receive(1.0) is None
        finally:
            client.close()
    return dropped


def worker_raw(area: Area, count: int, rng: random.Random, paced: bool = True) -> collections.Counter[str]:
    """``count`` raw frames at the worker socket from a peer that never said a valid hello.

    Paced, the flood stays within what the daemon drains (~20k frames/s), so RSS measures leaks, not backlog;
    unpaced, up to RCVHWM frames queue inside libzmq and RSS measures that backlog.
    """
    tally: collections.Counter[str] = collections.Counter()
    draw = gen.generator(gen.WORKER_KINDS, rng)
    peer = WorkerPeer(area.run_dir)
    try:
        for index in range(count):
            kind, parts = draw()
            tally[f"sent {kind}"] += 1
            peer.send(parts)
            if paced and index % PACE == PACE - 1:
                time.sleep(0.01)
        time.sleep(0.2)
        tally["replies"] += peer.drain()
    finally:
        # Deliver everything still queued (a loaded daemon drains slowly); dropping it would leave frames
        # that no log line can account for.
        peer.close(linger_ms=30_000)
    return tally


def worker_hypothesis(area: Area, examples: int, seed_value: int) -> int:
    peer = WorkerPeer(area.run_dir)
    ran = [0]

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(gen.worker_messages)
    def one(body: dict[str, Any]) -> None:
        ran[0] += 1
        peer.send([msgpack.packb(body, use_bin_type=True)])

    try:
        one()
    finally:
        peer.close(linger_ms=30_000)
    return ran[0]


def burst(area: Area, rng: random.Random, log: Path, result: FaultResult, pid: int) -> None:
    """An unpaced flood: the backlog queued in libzmq shows up in RSS (reported, not judged)."""
    before = rss(pid)
    worker_raw(area, BURST, rng, paced=False)
    settle(log)
    result.extra["fuzz_frames_burst"] = BURST
    result.note(f"unpaced burst of {BURST} worker frames: RSS {before / 2**20:.1f} -> {rss(pid) / 2**20:.1f} MiB "
                f"(backlog held in libzmq queues, bounded only by the worker socket's RCVHWM)")


def settle(path: Path, timeout: float = 60.0) -> None:
    """Wait until the daemon log stops growing (the daemon has drained what we sent)."""
    sizes: list[int] = []

    def still() -> bool:
        sizes.append(path.stat().st_size)
        return len(sizes) >= 3 and sizes[-1] == sizes[-3]

    wait_until(still, timeout, 0.25)


def job_ok(client: Control, pid: int, step: int) -> str:
    """'' when the job still runs the same worker with plausible progress; else what is wrong."""
    row = client.job("j")
    if row["state"] != "RUNNING" or row["pid"] != pid:
        return f"job is {row['state']} pid {row['pid']} (was RUNNING pid {pid})"
    if not step <= row["step"] < 10**8:
        return f"step went from {step} to {row['step']}"
    return ""


def run(ws: Workspace, raw: int, examples: int, seed_value: int) -> FaultResult:
    """Fuzz both sockets of one daemon that supervises a running job."""
    rng = random.Random(seed_value)
    result = FaultResult("protocol fuzzing")
    area = ws.area("fuzz")
    config = area.config({"j": {"checkpoint_every": 50, "budget": "2GiB", "train": {**SMALL, "steps": 10**7}}})
    log = area.root / "daemon.log"
    daemon = start_daemon(area, config, ws.mark)
    try:
        client = Control.ipc(area.run_dir)
        try:
            wait_until(lambda: client.job("j")["state"] == "RUNNING", 30, 0.05)
            before = client.job("j")
            fuzz(result, area, raw, examples, seed_value, rng, daemon.pid)
            settle(log)
            result.extra["rss_after"] = rss(daemon.pid)
            burst(area, rng, log, result, daemon.pid)
            verdict(result, log, job_ok(client, before["pid"], before["step"]), answers(area.run_dir, 5.0))
            result.extra["daemon_alive"] = result.extra["daemon_alive"] and daemon.alive()
            client.result("shutdown")
        finally:
            client.close()
        daemon.wait(60)
    finally:
        daemon.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
    return result


def rejections(log: Path) -> dict[str, int]:
    """How many worker frames the daemon's log reports as rejected or ignored, by event."""
    text = log.read_text(errors="replace")
    return {e: text.count(f'"event": "{e}"') for e in
            ("worker_frame_rejected", "worker_message_ignored", "worker_hello_rejected")}


def verdict(result: FaultResult, log: Path, problem: str, alive: bool) -> None:
    """Judge the whole pass: every frame accounted for in the log, daemon up, job untouched, RSS flat."""
    worker_frames = result.extra["worker_frames"] + BURST
    # A loaded machine can stall the daemon for longer than settle() waits: wait for the count itself.
    wait_until(lambda: sum(rejections(log).values()) >= worker_frames, 60, 0.25)
    logged = rejections(log)
    result.note(f"daemon log: {logged} (= {sum(logged.values())} of {worker_frames} worker frames)")
    before, after = result.extra["rss_before"], result.extra["rss_after"]
    result.extra["daemon_alive"] = alive
    result.note(f"daemon alive: {alive}; RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB after the paced "
                f"floods (limit +{RSS_SLACK // 2**20} MiB)")
    if problem:
        result.note(problem)
    flat = after - before <= RSS_SLACK
    accounted = sum(logged.values()) == worker_frames
    result.count += BURST
    result.extra["fuzz_frames"] = result.count
    result.survived = result.count if (alive and flat and accounted and not problem and result.survived) else 0


def fuzz(result: FaultResult, area: Area, raw: int, examples: int, seed_value: int, rng: random.Random,
         pid: int) -> None:
    """All fuzzing passes; fills the counts and notes of ``result``; survived=1 means no pass found a problem."""
    result.extra["rss_before"] = rss(pid)
    control = control_raw(area, raw, rng)
    codes_h: collections.Counter[str] = collections.Counter()
    ran, failure = control_hypothesis(area, examples, seed_value, codes_h)
    dropped = over_hard_limit(area, rng)
    worker = worker_raw(area, raw, rng)
    worker_ran = worker_hypothesis(area, examples, seed_value)
    replies = sum(n for k, n in control.items() if k.startswith(("error", "ok")))
    errors = sum(n for k, n in control.items() if k.startswith("error"))
    result.count = raw * 2 + ran + worker_ran + 3
    result.extra["worker_frames"] = raw + worker_ran
    codes = ", ".join(f"{k.removeprefix('error ')} {n}" for k, n in sorted(control.items()) if k.startswith("error"))
    result.note(f"control: {raw} raw frames -> {replies} replies, {errors} errors ({codes}), "
                f"{control['ok reply']} ok, {control['missing reply']} missing; {ran} hypothesis requests"
                + (f" FAILED: {failure}" if failure else f" all refused ({dict(sorted(codes_h.items()))})"))
    result.note(f"{dropped}/3 frames over the {HARD_LIMIT // 1024} KiB socket limit dropped by libzmq (no reply)")
    result.note(f"worker socket: {raw} raw + {worker_ran} hypothesis frames, {worker['replies']} replies")
    clean = replies == raw == errors and not failure and not worker["replies"]
    result.survived = int(clean)
