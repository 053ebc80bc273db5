"""Supervision overhead in lockstep: both arms alive at once, taking turns in short slices.

Whole-run pairs (``bench.overhead.measure``) compare runs that are seconds apart, on a machine whose speed
wanders by 10-20 % from one second to the next (a shared 2-core VM): one pair's ratio spreads 0.84-1.16, and a
dozen pairs cannot resolve a cost of 0.5 %. Here the unsupervised worker and the supervised one (its worker and
``mlxsupd run``) run side by side and take turns: one arm runs for a slice while the other is frozen with
SIGSTOP, the daemon included, so the daemon spends CPU only while its own worker runs. Adjacent slices see the
same machine a fraction of a second apart, and the order inside a pair alternates.

Both arms run ``bench.standalone``, the built-in job exactly as ``python -m worker`` runs it, which logs the
wall time of every ``end_step``; the supervised arm runs it as the job's ``command``. A step counts when it ran
from one ``end_step`` to the next inside a single slice of its arm (a freeze cuts one step per slice, which is
dropped). The ratio is supervised ÷ unsupervised steps per second over the counted steps, with a 95 % interval
from resampling slice pairs, and the ratio of median step times beside it as a robustness check.

The freezing is conservative for supervision: at each thaw the daemon catches up (a sample, the held
telemetry, a heartbeat) on the supervised arm's time, and its sampling cadence runs on wall time, so it samples
a little more often per second of its worker's running than it would alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import statistics
import subprocess
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.common import PYTHON, BenchError, Child, rounded, short_run_dir
from bench.daemon_cost import process_cpu
from bench.standalone import read_progress
from supervisor.config import write_config
from worker.cli import train_argv

ARMS = ("unsupervised", "supervised")
FOREVER = 10**7  # steps: the runs are stopped by the harness
WARMUP_STEPS = 40  # each arm, running alone, before the first slice (MLX's kernel cache, allocator pools)
RESAMPLES = 2000


class Arm:
    """One arm's processes, frozen and thawed together (SIGSTOP/SIGCONT to each process group)."""

    def __init__(self, name: str, progress: Path, groups: Sequence[int]) -> None:
        self.name, self.progress, self.groups = name, progress, list(groups)
        self.slices: list[tuple[float, float]] = []
        self.cpus: list[float] = []  # CPU seconds of each slice

    def send(self, signum: int) -> None:
        for group in self.groups:
            try:
                os.killpg(group, signum)
            except ProcessLookupError:
                raise BenchError(f"{self.name} arm: process group {group} is gone") from None

    def steps(self) -> int:
        return len(read_progress(self.progress))

    def cpu(self) -> float:
        """CPU seconds of the arm's processes so far (``process_cpu``: psutil, on Linux and macOS alike). Per slice
        it is good to a clock tick; the arm is frozen between its slices, so the slices' sum is exact."""
        return sum(process_cpu(pid) for group in self.groups for pid in _group_pids(group))


def _group_pids(group: int) -> list[int]:
    from supervisor.daemon.footprint import group_pids  # proc_listpgrppids on macOS, a /proc scan on Linux

    return [group, *(pid for pid in group_pids(group) if pid != group)]


def _wait_steps(arm: Arm, steps: int, timeout: float, children: Sequence[Child]) -> None:
    deadline = time.monotonic() + timeout
    while arm.steps() < steps:
        if time.monotonic() > deadline:
            raise BenchError(f"{arm.name} arm made fewer than {steps} steps in {timeout:.0f}s")
        if any(child.popen.poll() is not None for child in children):
            raise BenchError(f"{arm.name} arm: a process exited; see the logs in {arm.progress.parent}")
        time.sleep(0.05)


def _worker_group(daemon: Child, timeout: float) -> int:
    """The process group of the worker ``mlxsupd run`` spawned (it leads its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(daemon.pid).children():
            try:
                return os.getpgid(child.pid)
            except ProcessLookupError:
                continue
        if daemon.popen.poll() is not None:
            raise BenchError("mlxsupd run exited before spawning its worker")
        time.sleep(0.05)
    raise BenchError(f"mlxsupd run spawned no worker within {timeout:.0f}s")


def _slice_of(starts: list[float], slices: list[tuple[float, float]], wall: float) -> int | None:
    """The index of the slice ``wall`` falls in (``starts``: the slices' starts), or None between slices."""
    index = bisect_right(starts, wall) - 1
    return index if index >= 0 and wall <= slices[index][1] else None


def counted_steps(rows: list[tuple[int, float, float]], slices: list[tuple[float, float]]) -> list[list[float]]:
    """Per slice, the durations of the steps that ran wholly inside it: end_step to end_step (wall times)."""
    starts = [start for start, _ in slices]
    found: list[list[float]] = [[] for _ in slices]
    for (_, _, before), (_, _, after) in itertools.pairwise(rows):
        index = _slice_of(starts, slices, before)
        if index is not None and after <= slices[index][1]:
            found[index].append(after - before)
    return found


def _steps_in(rows: list[tuple[int, float, float]], slices: list[tuple[float, float]]) -> list[int]:
    """Per slice, the end_steps logged inside it."""
    starts = [start for start, _ in slices]
    counts = [0] * len(slices)
    for _, _, wall in rows:
        index = _slice_of(starts, slices, wall)
        if index is not None:
            counts[index] += 1
    return counts


def _interval(pairs: Sequence[Any], ratio: Callable[[Sequence[Any]], float | None],
              seed: int = 0) -> list[float | None] | None:
    """95 % interval of ``ratio`` over ``pairs`` resampled with replacement (slice pairs stay together)."""
    rng = random.Random(seed)
    draws = sorted(r for r in (ratio(rng.choices(pairs, k=len(pairs))) for _ in range(RESAMPLES)) if r)
    if not draws:
        return None
    return [rounded(draws[int(0.025 * len(draws))]), rounded(draws[int(0.975 * len(draws)) - 1])]


def cpu_summary(unsup_cpu: list[float], unsup_steps: list[int], sup_cpu: list[float], sup_steps: list[int],
                seed: int = 0) -> dict[str, Any]:
    """CPU per step unsupervised ÷ supervised (worker and daemon), with a 95 % interval over slice pairs."""
    pairs = list(zip(unsup_cpu, unsup_steps, sup_cpu, sup_steps, strict=False))

    def ratio(sample: Sequence[tuple[float, int, float, int]]) -> float | None:
        uc, us, sc, ss = (sum(p[i] for p in sample) for i in range(4))
        return (uc / us) / (sc / ss) if us and ss and sc else None

    return {"ratio": rounded(ratio(pairs)), "ci95": _interval(pairs, ratio, seed),
            "ms_per_step": {"unsupervised": rounded(1000 * sum(unsup_cpu) / max(1, sum(unsup_steps)), 3),
                            "supervised": rounded(1000 * sum(sup_cpu) / max(1, sum(sup_steps)), 3)}}


def _ratio(pairs: Sequence[tuple[list[float], list[float]]]) -> float | None:
    """Supervised ÷ unsupervised steps/s over the steps of ``pairs`` (unsupervised durations, supervised)."""
    unsup = [d for u, _ in pairs for d in u]
    sup = [d for _, s in pairs for d in s]
    if not unsup or not sup:
        return None
    return (len(sup) / sum(sup)) / (len(unsup) / sum(unsup))


def summarize(unsup: list[list[float]], sup: list[list[float]], seed: int = 0) -> dict[str, Any]:
    """The ratio, its 95 % bootstrap interval over slice pairs, and the ratio of median step times."""
    pairs = list(zip(unsup, sup, strict=False))
    all_unsup = [d for slice_ in unsup for d in slice_]
    all_sup = [d for slice_ in sup for d in slice_]
    return {
        "ratio": rounded(_ratio(pairs)), "ci95": _interval(pairs, _ratio, seed),
        "median_ratio": rounded(statistics.median(all_unsup) / statistics.median(all_sup))
        if all_unsup and all_sup else None,
        "steps": {"unsupervised": len(all_unsup), "supervised": len(all_sup)},
        "steps_per_s": {"unsupervised": rounded(len(all_unsup) / sum(all_unsup), 2) if all_unsup else None,
                        "supervised": rounded(len(all_sup) / sum(all_sup), 2) if all_sup else None},
    }


def measure(work: Path, train: dict[str, Any], seconds: float, slice_seconds: float,
            timeout: float) -> dict[str, Any]:
    """``seconds`` of slices per arm, ``slice_seconds`` each, in alternating pairs."""
    work.mkdir(parents=True, exist_ok=True)
    progress = {arm: work / f"{arm}.progress" for arm in ARMS}
    for path in progress.values():
        path.unlink(missing_ok=True)
    worker = [PYTHON, "-m", "bench.standalone", "--progress"]
    train = {**train, "steps": FOREVER}
    with short_run_dir() as run_dir, open(work / "unsupervised.log", "ab") as ulog, \
            open(work / "mlxsupd.log", "ab") as dlog:
        job = {"budget": "6GiB", "checkpoint_every": 0, "hang_timeout": 600,
               "command": [*worker, str(progress["supervised"]), *train_argv(train)]}
        config = write_config(work / "mlxsup.toml", {"run_dir": str(run_dir), "state_dir": str(work / "state")},
                              {"j": job})
        daemon_argv = [PYTHON, "-m", "supervisor.cli.mlxsupd", "run", "-c", str(config), "j", "--log-format", "json"]
        with Child(daemon_argv, stdout=dlog, stderr=subprocess.STDOUT) as daemon, \
                Child([*worker, str(progress["unsupervised"]), *train_argv(train)], stdout=ulog,
                      stderr=subprocess.STDOUT) as alone:
            group = _worker_group(daemon, timeout)
            try:
                arms = {"unsupervised": Arm("unsupervised", progress["unsupervised"], [alone.pid]),
                        "supervised": Arm("supervised", progress["supervised"], [daemon.pid, group])}
                return _run_slices(arms, seconds, slice_seconds, timeout, [daemon, alone], daemon.pid)
            finally:  # the Children kill their own groups, stopped or not; the worker leads one of its own
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)


def _run_slices(arms: dict[str, Arm], seconds: float, slice_seconds: float, timeout: float,
                children: Sequence[Child], daemon_pid: int) -> dict[str, Any]:
    unsup, sup = arms["unsupervised"], arms["supervised"]
    sup.send(signal.SIGSTOP)  # warm up each arm alone
    _wait_steps(unsup, WARMUP_STEPS, timeout, children)
    unsup.send(signal.SIGSTOP)
    sup.send(signal.SIGCONT)
    _wait_steps(sup, WARMUP_STEPS, timeout, children)
    sup.send(signal.SIGSTOP)
    daemon_cpu = process_cpu(daemon_pid)
    pairs = max(1, round(seconds / slice_seconds))
    for index in range(pairs):
        for arm in (unsup, sup) if index % 2 == 0 else (sup, unsup):
            cpu = arm.cpu()
            start = time.time()
            arm.send(signal.SIGCONT)
            time.sleep(slice_seconds)
            end = time.time()
            arm.send(signal.SIGSTOP)
            arm.slices.append((start, end))
            arm.cpus.append(arm.cpu() - cpu)
    daemon_cpu = process_cpu(daemon_pid) - daemon_cpu
    durations = {name: counted_steps(read_progress(arm.progress), arm.slices) for name, arm in arms.items()}
    result = summarize(durations["unsupervised"], durations["supervised"])
    steps = {name: _steps_in(read_progress(arm.progress), arm.slices) for name, arm in arms.items()}
    result["cpu"] = cpu_summary(unsup.cpus, steps["unsupervised"], sup.cpus, steps["supervised"])
    supervised_seconds = sum(sum(d) for d in durations["supervised"])
    result.update({
        "slices_per_arm": pairs, "slice_seconds": slice_seconds,
        "daemon_cpu_fraction_of_supervised_time": rounded(daemon_cpu / supervised_seconds, 5)
        if supervised_seconds else None,
    })
    return result
