"""What leak forensics cost: a census in milliseconds, and attribution's share of the daemon's CPU per message.

- census: ``bench.census_cost`` in a child (it imports MLX, which the daemon never does): one count of a loop's
  names for the built-in model and for the tiny mlx-lm model.
- attribution: the daemon's handling of a step message, in process and on CPU time, side by side in alternating
  blocks: decode the frame and hand it to the job's lifecycle (``Lifecycle.handle(StepIn)``: counters, the
  estimator, the policy, the telemetry record action), without and with the diagnosis beside it
  (``JobDiagnosis.step``: the four thinned slopes of the life, which is what ``supervisor.daemon.leaks`` adds per
  message). The ratio is with / without; the real daemon also polls, receives and writes each message, so its
  whole cost per message is larger and the attribution's share smaller than this ratio says.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, BenchError, Child
from protocol import Hello, Step, decode, encode
from supervisor.core import events as ev
from supervisor.core.diagnosis import JobDiagnosis
from supervisor.core.lifecycle import Lifecycle, Settings
from supervisor.core.policy import Limits, PolicyConfig

MiB = 2**20


def census(work: Path, repeats: int, timeout: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "census.json"
    child = Child([PYTHON, "-m", "bench.census_cost", "--out", str(out), "--tiny", str(work / "tiny"),
                   "--repeats", str(repeats)])
    code = child.wait(timeout)
    if code != 0 or not out.exists():
        raise BenchError(f"bench.census_cost exited {code}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _running() -> Lifecycle:
    lifecycle = Lifecycle(Settings(PolicyConfig()), Limits(6 * 2**30, 7 * 2**30, 8 * 2**30))
    lifecycle.handle(ev.Start(0.0))
    assert lifecycle.life is not None
    lifecycle.handle(ev.Spawned(lifecycle.life.id, 0.0, 4242, 0))
    lifecycle.handle(ev.HelloIn(0.0, Hello("t", 4242, "bench", 0, 10**9, 8, 1)))
    return lifecycle


def _block(lifecycle: Lifecycle, diagnosis: JobDiagnosis | None, frames: list[bytes], first: int) -> float:
    """CPU seconds per message over ``frames``, steps numbered from ``first``."""
    life = lifecycle.life
    assert life is not None
    started = time.process_time()
    for offset, frame in enumerate(frames):
        message = decode(frame)
        assert isinstance(message, Step)
        now = (first + offset) * 0.01
        if diagnosis is not None:
            diagnosis.step(life.id, now, (message.step, message.footprint, message.mlx_active, message.mlx_cache))
        lifecycle.handle(ev.StepIn(now, message))
    return (time.process_time() - started) / len(frames)


def attribution(messages: int, blocks: int) -> dict[str, Any]:
    """Daemon CPU per step message without and with attribution, alternating blocks of ``messages``."""
    plain, attributed = _running(), _running()
    diagnosis = JobDiagnosis(float(MiB))
    rows: dict[str, list[float]] = {"without_us": [], "with_us": []}
    step = 1
    for _ in range(blocks):
        frames = [encode(Step(s, 8, 1, 2.5, 0.01, 1000 * MiB + 2 * s * MiB, 10 * MiB, 1100 * MiB,
                              1500 * MiB + 2 * s * MiB)) for s in range(step, step + messages)]
        rows["without_us"].append(_block(plain, None, frames, step) * 1e6)
        rows["with_us"].append(_block(attributed, diagnosis, frames, step) * 1e6)
        step += messages
    without, with_ = statistics.median(rows["without_us"]), statistics.median(rows["with_us"])
    ratios = [b / a for a, b in zip(rows["without_us"], rows["with_us"], strict=True) if a > 0]
    return {"daemon_cpu_us_per_msg_without": round(without, 2), "daemon_cpu_us_per_msg_with": round(with_, 2),
            "attribution_cpu_ratio": round(statistics.median(ratios), 3),
            "cpu_us_pair": [round(without, 2), round(with_, 2)],
            "attribution_cpu_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "messages_per_block": messages, "blocks": blocks,
            "verdict_of_the_life": diagnosis.status()["verdict"]}


def measure(work: Path, census_repeats: int, messages: int, blocks: int, timeout: float) -> dict[str, Any]:
    return {"census_ms": census(work / "census", census_repeats, timeout), **attribution(messages, blocks)}
