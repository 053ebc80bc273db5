"""An mlx-lm LoRA fine-tune as a gang of 2 ranks, as ``mlx.launch ... mlx_lm.lora`` runs it, under the daemon.

The reference is the same fine-tune started by hand (``MLX_RANK`` + ``MLX_HOSTFILE``, no daemon), uninterrupted.
The supervised runs leak on rank 1 only: the policy stops that rank, the stop flag rides in the gradient
all-reduce, both ranks checkpoint at one step, the gang restarts, and the end is bitwise equal to the reference:
on loopback (one daemon) and across two network namespaces (one daemon each, the ring over a veth pair).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import write_config
from supervisor.daemon.history import read_history
from supervisor.daemon.recorder import read_records
from tests._mlx_lm import BASE_OPTIONS, arrays, bitwise_equal, build_tiny, max_abs_difference, train_in_process
from tests.conftest import mlxsupd
from tests.gangs import free_port_base, rank_pid, same_weights
from tests.test_gang_hosts import ADDRESSES, CONTROL_PORT, Hosts, Net, keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
ITERS = 20
BATCH = 4  # mlx-lm's batch_size: the gang's; each rank trains 2 examples of every batch
FINAL = f"ckpt-{ITERS:010d}"
# Only rank 1 leaks: 25 MiB a step against a 450 MiB budget per rank stops the gang every 5 to 10 steps (a rank
# starts near 100 MiB, and the leak policy recycles when the budget is about 6 steps' growth away: 258 MiB at
# step 7 measured). min_steps_per_life = 0: lives that short must not also shrink the batch, which changes the
# sums' order and so the last bits; each life keeps the reference's batch.
LEAK_ENV = {"HF_HUB_OFFLINE": "1", "MLXSUP_INJECT_LEAK_MB_PER_STEP": "25", "MLXSUP_INJECT_RANK": "1"}
Tiny = tuple[Path, Path]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def reference(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks of ``python -m worker.mlx_lm`` started by hand, uninterrupted; their final checkpoint."""
    directory = tmp_path_factory.mktemp("reference")
    base = free_port_base(2, 1)
    hostfile = directory / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(2)]))
    argv = [sys.executable, "-m", "worker.mlx_lm", "--model", str(tiny[0]), "--data", str(tiny[1]), "--iters",
            str(ITERS), "--batch-size", str(BATCH), "--save-every", "10", "--adapter-path", str(directory / "ad"),
            *BASE_OPTIONS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSUP_")}
    env.update(HF_HUB_OFFLINE="1", MLX_HOSTFILE=str(hostfile), MLXSUP_CHECKPOINT_DIR=str(directory / "ckpt"),
               MLXSUP_TEST_MARK=str(directory))
    procs = [subprocess.Popen(argv, env={**env, "MLX_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True) for r in range(2)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return directory / "ckpt" / FINAL


def lora_job(tiny: Tiny, adapters: Path, **job: Any) -> dict[str, Any]:
    """The reference's fine-tune as a 2-rank gang job (ranks = 2 unless hosts are given)."""
    return {"ranks": 2, "budget": "450MiB", "checkpoint_every": 10, "backoff_initial": 0.2, "startup_timeout": 60.0,
            "hang_timeout": 20.0, "kill_grace": 1.0, "min_steps_per_life": 0, "env": LEAK_ENV, **job,
            "mlx_lm": {"model": str(tiny[0]), "data": str(tiny[1]), "iters": ITERS, "batch_size": BATCH,
                       "num_layers": 4, "learning_rate": 1e-4, "val_batches": 2, "steps_per_eval": 10,
                       "save_every": 10, "adapter_path": str(adapters)}}


def check_stops(history: list[dict[str, Any]], deciding: list[dict[str, Any]] | None = None) -> list[list[int]]:
    """Every gang stop in ``history`` (the leader's) had both ranks at one step, and the leaking rank's policy
    decided each (in ``deciding``, the history of rank 1's daemon; by default the same); the stops."""
    stops = [e["steps"] for e in history if e["event"] == "gang_stop"]
    assert stops and all(len(steps) == 2 and len(set(steps)) == 1 for steps in stops), stops
    decisions = [e for e in (history if deciding is None else deciding)
                 if e["event"] == "decision" and e["action"] == "checkpoint_exit"]
    assert decisions and all(d["rank"] == 1 for d in decisions)
    restarts = [e for e in history if e["event"] == "restart"]
    assert all(e["accum"] == 1 for e in restarts), f"a restart changed the batch: {restarts}"
    return [list(s) for s in stops]


def check_files(checkpoints: Path, adapters: Path, reference: Path) -> None:
    """The writer's checkpoint is the reference's bit for bit, each rank kept its own state at the final step,
    and the adapter file the host's writer wrote holds the final trainable parameters."""
    import mlx.core as mx

    assert same_weights(checkpoints / FINAL, reference)
    for rank in (0, 1):
        assert (checkpoints / "ranks" / f"rank-{rank}" / FINAL / "meta.json").exists()
    written = mx.load(str(adapters / "adapters.safetensors"))
    final = mx.load(str(checkpoints / FINAL / "model.safetensors"))
    assert isinstance(written, dict) and isinstance(final, dict) and bitwise_equal(written, final)
    assert json.loads((adapters / "adapter_config.json").read_text())["batch_size"] == BATCH


def step_seconds(telemetry: Path) -> dict[int, float]:
    """Median seconds per step of each rank (for the record)."""
    times: dict[int, list[float]] = {}
    for record in read_records(telemetry):
        if record.get("k") == "step":
            times.setdefault(record.get("rank", 0), []).append(record["step_seconds"])
    return {rank: sorted(values)[len(values) // 2] for rank, values in sorted(times.items())}


class TestSameMath:
    """The gang's step is the single process's step: each rank's micro-batches are weighted by their share of
    the gang's tokens, so averaging over the ranks gives the per-token mean of the whole batch."""

    def test_two_ranks_end_within_1e_5_of_one_process(self, tiny: Tiny, reference: Path, tmp_path: Path) -> None:
        from worker.checkpoint import load_latest

        alone = arrays(train_in_process(*tiny, tmp_path, ITERS, "--batch-size", str(BATCH)))
        gang = load_latest(reference.parent)
        assert gang is not None and gang.step == ITERS
        difference = max_abs_difference(arrays(gang), alone)
        print(f"2 ranks vs 1 process after {ITERS} steps: max abs difference {difference:.3g}")  # for the record
        assert difference <= 1e-5


class TestLoopback:
    """One daemon, two ranks on this host."""

    def test_leak_on_one_rank_stops_both_at_one_step_and_resumes_bitwise(
            self, tiny: Tiny, reference: Path, config_file: Any, tmp_path: Path, spawn: Any) -> None:
        started = time.monotonic()
        job = lora_job(tiny, tmp_path / "adapters", gang={"port": free_port_base()})
        summary = tmp_path / "summary.json"
        daemon = spawn(mlxsupd("run", "-c", str(config_file({"j": job})), "j", "--summary", str(summary),
                               "--log-format", "json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = daemon.communicate(timeout=300)
        assert summary.exists(), stderr.decode()[-3000:]
        result = json.loads(summary.read_text())
        assert daemon.returncode == 0 and result["outcome"] == "finished", result
        assert result["steps_completed"] == ITERS and result["restarts"] >= 1
        assert set(result["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert result["samples_over_budget"] == 0
        job_dir = tmp_path / "state" / "jobs" / "j"
        stops = check_stops(read_history(job_dir / "history.jsonl"))
        assert [list(s) for s in result["stop_steps"]] == stops
        check_files(job_dir / "checkpoints", tmp_path / "adapters", reference)
        print(f"loopback: stops {stops}, restarts {result['restarts']}, median step seconds per rank "
              f"{step_seconds(job_dir / 'telemetry.jsonl')}, {time.monotonic() - started:.1f} s")


class TestOneLine:
    """``mlxsupd run --ranks 2 -- mlx_lm.lora ...``: the command mlx.launch would run, as a supervised gang."""

    def test_the_one_line_gang_ends_bitwise_equal_to_the_hand_started_ranks(
            self, tiny: Tiny, reference: Path, tmp_path: Path, spawn: Any) -> None:
        defaults = write_config(tmp_path / "port.toml", {}, {"lora": {"gang": {"port": free_port_base()}}})
        argv = mlxsupd("run", "--ranks", "2", "--budget", "1GiB", "--state-dir", str(tmp_path / "s"), "-c",
                       str(defaults), "--summary", str(tmp_path / "summary.json"), "--",
                       "mlx_lm.lora", "--model", str(tiny[0]), "--data", str(tiny[1]), "--train", "--iters",
                       str(ITERS), "--batch-size", str(BATCH), "--save-every", "10", "--adapter-path",
                       str(tmp_path / "adapters"), *BASE_OPTIONS)
        daemon = spawn(argv, env={"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, stderr = daemon.communicate(timeout=300)
        assert daemon.returncode == 0, stderr.decode()[-3000:]
        result = json.loads((tmp_path / "summary.json").read_text())
        assert result["outcome"] == "finished" and [r["rank"] for r in result["ranks"]] == [0, 1]
        check_files(tmp_path / "s" / "jobs" / "lora" / "checkpoints", tmp_path / "adapters", reference)


class TestKilledRank:
    """A rank SIGKILLed mid-run: the survivor loses its peer, the gang restarts from the last checkpoint."""

    def test_sigkill_of_one_rank_resumes_bitwise(self, tiny: Tiny, reference: Path, config_file: Any,
                                                 tmp_path: Path, spawn: Any) -> None:
        job = lora_job(tiny, tmp_path / "adapters", gang={"port": free_port_base()}, checkpoint_every=5,
                       env={"HF_HUB_OFFLINE": "1"})
        summary = tmp_path / "summary.json"
        daemon = spawn(mlxsupd("run", "-c", str(config_file({"j": job})), "j", "--summary", str(summary),
                               "--log-format", "json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        victim = rank_pid(tmp_path, 1, 5)
        os.kill(victim, signal.SIGKILL)
        _, stderr = daemon.communicate(timeout=300)
        assert summary.exists(), stderr.decode()[-3000:]
        result = json.loads(summary.read_text())
        assert result["outcome"] == "finished" and result["restarts"] == 1, result
        assert result["restart_reasons"] == {f"rank 1 killed by signal {signal.SIGKILL.value}": 1}
        check_files(tmp_path / "state" / "jobs" / "j" / "checkpoints", tmp_path / "adapters", reference)


@pytest.fixture
def run_dirs() -> Iterator[tuple[Path, Path]]:
    """The two daemons' run dirs (short: their ipc socket paths must fit), removed afterwards."""
    dirs = (Path(f"/tmp/mlxsup-la{os.getpid() % 100000}"), Path(f"/tmp/mlxsup-lb{os.getpid() % 100000}"))
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
    yield dirs
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def lora_configs(tmp_path: Path, tiny: Tiny, run_dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    """The leader's (namespace A, rank 0) and the follower's (B, rank 1) config: one job, each host its own
    state and adapter directory."""
    keys(tmp_path / "keys")
    paths = []
    for side, run_dir in zip("ab", run_dirs, strict=True):
        daemon: dict[str, Any] = {"run_dir": str(run_dir), "state_dir": str(tmp_path / side)}
        gang: dict[str, Any] = {"port": 33000}
        if side == "a":
            daemon["control"] = {"tcp": f"tcp://{ADDRESSES[0]}:{CONTROL_PORT}",
                                 "server_key": str(tmp_path / "keys" / "server.key_secret"),
                                 "authorized_keys": str(tmp_path / "keys" / "authorized_keys")}
        else:
            gang.update(leader=f"tcp://{ADDRESSES[0]}:{CONTROL_PORT}", leader_key=str(tmp_path / "keys" / "server.key"),
                        client_key=str(tmp_path / "keys" / "follower.key_secret"))
        job = lora_job(tiny, tmp_path / side / "adapters", hosts=list(ADDRESSES), ranks=1, gang=gang)
        paths.append(write_config(tmp_path / f"{side}.toml", daemon, {"j": job}))
    return paths[0], paths[1]


class LoraHosts(Hosts):
    """Two daemons in two namespaces running the mlx-lm gang."""

    def __init__(self, net: Net, tmp_path: Path, spawn: Any, tiny: Tiny, run_dirs: tuple[Path, Path]) -> None:
        self.tmp_path = tmp_path
        self.net, self.spawn = net, spawn
        self.configs = lora_configs(tmp_path, tiny, run_dirs)
        self.daemons = [self._start(i) for i in (0, 1)]

    def final(self, side: str) -> Path:
        return self.checkpoints(side) / FINAL

    def checkpoints(self, side: str) -> Path:
        return self.tmp_path / side / "jobs" / "j" / "checkpoints"


@pytest.fixture
def net() -> Iterator[Net]:
    made = Net()
    problem = made.create()
    if problem:
        made.destroy()
        pytest.skip(f"cannot make network namespaces: {problem}")
    yield made
    made.destroy()


@pytest.mark.linux_only("needs Linux network namespaces (ip netns)")
class TestTwoNamespaces:
    """One daemon per namespace, one rank each, the ring over the veth pair; the follower's rank leaks."""

    def test_leak_on_the_followers_rank_stops_both_hosts_at_one_step_and_resumes_bitwise(
            self, tiny: Tiny, reference: Path, net: Net, tmp_path: Path, spawn: Any,
            run_dirs: tuple[Path, Path]) -> None:
        started = time.monotonic()
        hosts = LoraHosts(net, tmp_path, spawn, tiny, run_dirs)
        hosts.wait_finished(timeout=300)
        hosts.stop()
        stops = check_stops(hosts.history("a"), hosts.history("b"))
        assert any(e["event"] == "restart" for e in hosts.history("a"))
        for side in "ab":  # each host's writer wrote the gang's checkpoint and adapters on its own disk
            rank = "ab".index(side)
            assert (hosts.checkpoints(side) / "ranks" / f"rank-{rank}" / FINAL / "meta.json").exists()
            assert same_weights(hosts.final(side), reference)
        assert (tmp_path / "a" / "adapters" / "adapters.safetensors").exists()
        assert (tmp_path / "b" / "adapters" / "adapters.safetensors").exists()
        print(f"two namespaces: stops {stops}, rank 0 median step seconds "
              f"{step_seconds(tmp_path / 'a' / 'jobs' / 'j' / 'telemetry.jsonl')}, rank 1 "
              f"{step_seconds(tmp_path / 'b' / 'jobs' / 'j' / 'telemetry.jsonl')}, {time.monotonic() - started:.1f} s")
