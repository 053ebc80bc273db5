"""Helpers of the gang tests: free ring ports, an unsupervised reference run, supervised runs, weights compared
bit for bit."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.daemon.history import read_history
from tests.conftest import SMALL, mlxsupd

WORLD = 2
# Every test trains the same job: the supervised runs must end bitwise equal to the reference.
TRAIN = {**SMALL, "steps": 36, "seed": 3}
BATCH = 4


def free_port_base(world: int = WORLD, window: int = 16) -> int:
    """A base port whose ring ports (``window`` generations of ``world`` ranks) are all free now."""
    for _ in range(50):
        base = random.randrange(20000, 60000 - world * window)
        try:
            for port in range(base, base + world * window):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range found")


def reference_run(directory: Path, train: dict[str, Any] | None = None, batch: int = BATCH) -> Path:
    """Two ranks trained by hand (MLX_RANK + MLX_HOSTFILE, no daemon): the uninterrupted run to compare with.
    Returns its checkpoint directory."""
    directory.mkdir(parents=True, exist_ok=True)
    base = free_port_base(WORLD, 1)
    hostfile = directory / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(WORLD)]))
    checkpoints = directory / "checkpoints"
    options = {**TRAIN, **(train or {}), "batch": batch, "checkpoint-dir": str(checkpoints)}
    argv = [sys.executable, "-m", "worker"] + [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}",
                                                                                          str(v))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSUP_")}
    procs = [subprocess.Popen(argv, env={**env, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile),
                                         "MLXSUP_TEST_MARK": str(directory)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
             for r in range(WORLD)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    return checkpoints


def gang_job(port: int, **job: Any) -> dict[str, Any]:
    """A two-rank job of the built-in LM with short timeouts."""
    train = {**TRAIN, **job.pop("train", {})}
    return {"ranks": WORLD, "batch": BATCH, "checkpoint_every": 6, "budget": "1GiB", "startup_timeout": 60.0,
            "hang_timeout": 20.0, "kill_grace": 1.0, "backoff_initial": 0.2, "gang": {"port": port}, **job,
            "train": train}


def start(spawn: Any, config: Path, summary: Path) -> subprocess.Popen[bytes]:
    return spawn(mlxsupd("run", "-c", str(config), "j", "--summary", str(summary), "--log-format", "json"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def finish(daemon: subprocess.Popen[bytes], summary: Path, timeout: float = 240) -> dict[str, Any]:
    daemon.wait(timeout=timeout)
    assert summary.exists(), "no summary written"
    result: dict[str, Any] = json.loads(summary.read_text())
    return result


def history(tmp_path: Path) -> list[dict[str, Any]]:
    return read_history(tmp_path / "state" / "jobs" / "j" / "history.jsonl")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def rank_pid(tmp_path: Path, rank: int, after_checkpoint: int) -> int:
    """The pid of ``rank`` once the gang has checkpointed at least at step ``after_checkpoint``."""
    def found() -> int | None:
        events = history(tmp_path)
        if not any(e["event"] == "checkpoint" and e["step"] >= after_checkpoint for e in events):
            return None
        spawns = [e for e in events if e["event"] == "spawn" and e.get("rank") == rank]
        return int(spawns[-1]["pid"]) if spawns else None

    pid: int = wait_for(found, f"a checkpoint at step {after_checkpoint}")
    return pid


def same_weights(a: Path, b: Path) -> bool:
    """Whether two checkpoints hold bit-identical model and optimizer tensors (names, bits, dtype and shape)."""
    import mlx.core as mx

    from tests._mlx_lm import bitwise_equal

    return all(bitwise_equal(mx.load(str(a / name)), mx.load(str(b / name)))  # type: ignore[arg-type]
               for name in ("model.safetensors", "optimizer.safetensors"))


def last_losses(tmp_path: Path, count: int) -> list[float]:
    """Rank 0's loss over the last ``count`` steps recorded (the newest record of each step)."""
    from supervisor.daemon.recorder import read_records

    steps: dict[int, float] = {}
    for record in read_records(tmp_path / "state" / "jobs" / "j" / "telemetry.jsonl"):
        if record.get("k") == "step" and record.get("rank", 0) == 0:
            steps[record["step"]] = record["loss"]
    return [steps[s] for s in sorted(steps)[-count:]]


def eval_loss(checkpoint: Path, train: dict[str, Any] | None = None) -> float:
    """The model of ``checkpoint`` on a fixed batch of 64 samples it was not trained on (another seed)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from worker.lm import ByteLM, ModelConfig, load_corpus, loss_fn, step_batch

    options = {**TRAIN, **(train or {})}
    model = ByteLM(ModelConfig(dim=options["dim"], layers=options["layers"], heads=options["heads"],
                               context=options["context"]))
    weights = mx.load(str(checkpoint / "model.safetensors"))
    assert isinstance(weights, dict)
    model.update(tree_unflatten(list(weights.items())))
    tokens = step_batch(load_corpus(), 99, 0, 64, options["context"])
    return float(loss_fn(model, tokens).item())
