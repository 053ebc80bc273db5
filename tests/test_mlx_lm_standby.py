"""The mlx-lm job kind's standby: where it waits, what it holds, and that a recycle through it stays exact.

A standby successor runs ``python -m worker.mlx_lm`` up to ``worker.mlx_lm.run.ready`` and waits there. That point
must come after the heavy imports (what a standby is for) and before the run reads, seeds or restores anything
(what keeps a resume bitwise, and keeps the model's weights out of the standby's memory).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import Go, Heartbeat, Hello, Step
from tests._mlx_lm import BASE_OPTIONS, bitwise_equal, build_tiny, offline_env, train_in_process
from tests.conftest import mlxsupd
from tests.test_mlx_lm_supervised import ITERS, Run, job
from tests.test_standby_worker import Daemon, group_rss, wait_standby

pytestmark = pytest.mark.slow
Tiny = tuple[Path, Path]
PROBE = Path(__file__).parent / "workers" / "mlx_lm_ready_probe.py"
MiB = 1 << 20
# What a waiting standby of the mlx-lm job kind may hold (Linux RSS of its process group): Python, MLX, ZeroMQ,
# mlx-lm and transformers imported, the Session's socket and thread; never the model, its tokenizer or data.
# Measured at about 85 MiB here (imports alone: 80 MiB; the built-in job's standby: about 35 MiB).
STANDBY_BOUND = 128 * MiB
# The large model's shape: 4 Llama layers of width 1024, about 240 MiB of float32 weights, so that a standby
# that had read them could not stay under STANDBY_BOUND.
LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 4, "num_key_value_heads": 2}
HEAVY = ("mlx.core", "mlx.nn", "mlx.optimizers", "mlx_lm", "mlx_lm.tuner.trainer", "mlx_lm.tuner.datasets",
         "transformers", "zmq", "worker.session")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """The tiny model's tokenizer and data with LARGE's weights."""
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    from worker.mlx_lm import tiny

    out = tmp_path_factory.mktemp("large")
    config = {**tiny.MODEL_ARGS, **LARGE, "vocab_size": len(tiny.vocabulary()),
              "eos_token_id": tiny.vocabulary().index("</s>")}
    with offline_env():
        mx.random.seed(0)
        model = Model(ModelArgs.from_dict(config))
        mx.eval(model.parameters())
        save_model(out / "model", model)
        save_config(config, out / "model" / "config.json")
        tiny.write_tokenizer(out / "model")
        tiny.write_data(out / "data", 0)
    return out / "model", out / "data"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    scripted = Daemon(tmp_path)
    try:
        yield scripted
    finally:
        scripted.close()


def spawn_standby(daemon: Daemon, model: Tiny, token: str, iters: int) -> subprocess.Popen[bytes]:
    """``python -m worker.mlx_lm`` spawned as the daemon spawns a standby (MLXSUP_STANDBY=1, its own token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSUP_")}
    env.update(MLXSUP_ENDPOINT=daemon.endpoint, MLXSUP_TOKEN=token, MLXSUP_JOB="lm", MLXSUP_STANDBY="1",
               MLXSUP_CHECKPOINT_DIR=str(daemon.tmp / "ckpt"), MLXSUP_BATCH="4", MLXSUP_ACCUM="1",
               MLXSUP_ORPHAN_TIMEOUT="30", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "worker.mlx_lm", "--model", str(model[0]), "--data", str(model[1]), "--iters",
            str(iters), "--adapter-path", str(daemon.tmp / "adapters"), *BASE_OPTIONS]
    with open(daemon.tmp / "standby.err", "wb") as err:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)
    daemon.procs.append(proc)
    return proc


def probe(tiny: Tiny, work: Path, iters: int) -> dict[str, Any]:
    """One standalone run under the probe, checkpointing into ``work/ckpt``; what it recorded."""
    out = work / "probe.json"
    argv = [sys.executable, str(PROBE), str(out), str(tiny[0]), str(tiny[1]), str(work / "ckpt"), "--",
            "--model", str(tiny[0]), "--data", str(tiny[1]), "--iters", str(iters), "--adapter-path",
            str(work / "adapters"), *BASE_OPTIONS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXSUP_")}
    env.update(HF_HUB_OFFLINE="1", MLXSUP_CHECKPOINT_DIR=str(work / "ckpt"))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded: dict[str, Any] = json.loads(out.read_text())
    assert recorded["code"] == 0
    return recorded


class TestReadyPoint:
    """``ready`` comes after the imports and before anything of the run is read, seeded or restored."""

    def test_nothing_is_read_or_seeded_before_ready_and_everything_after(self, tiny: Tiny, tmp_path: Path) -> None:
        train_in_process(*tiny, tmp_path, 4)  # a checkpoint at step 4, so that the probed run restores one
        recorded = probe(tiny, tmp_path, 8)
        kinds = [kind for kind, _ in recorded["events"]]
        assert kinds.count("ready") == 1
        before, after = recorded["events"][:kinds.index("ready")], recorded["events"][kinds.index("ready") + 1:]
        assert before == []
        opened = [detail for kind, detail in after if kind == "open"]
        # The probe does see what the run reads and seeds, so the empty "before" means something.
        assert any(p.startswith(str(tiny[0].resolve())) for p in opened)  # config, tokenizer
        assert any(p.startswith(str(tiny[1].resolve())) for p in opened)  # the data set
        assert any(p.startswith(str((tmp_path / "ckpt").resolve())) for p in opened)  # the checkpoint restored
        assert any(kind == "mx.load" and detail.endswith("model.safetensors") for kind, detail in after)
        assert ["seed", "0"] in after

    def test_the_heavy_imports_are_done_at_ready(self, tiny: Tiny, tmp_path: Path) -> None:
        recorded = probe(tiny, tmp_path, 2)
        at_ready, at_end = set(recorded["modules_at_ready"]), set(recorded["modules_at_end"])
        assert set(HEAVY) <= at_ready
        late = sorted(at_end - at_ready)
        print(f"{len(at_ready)} modules imported at ready, {len(late)} after: {late}")  # for the record
        # Left for after "go": only the architecture the model's config names (mlx_lm.models.llama and its
        # transformers twin), which a standby cannot know without reading the run's files.
        assert late and all(".models." in name for name in late), late


class TestWaitingStandby:
    """An mlx-lm standby waits at ``ready`` holding the imports only, then runs go's orders."""

    def test_holds_no_weights_while_waiting_and_reads_them_after_go(self, large: Tiny, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        proc = spawn_standby(daemon, large, token, iters=8)
        identity, _ = wait_standby(daemon, token)
        deadline = time.monotonic() + 2.0  # it waits, sending heartbeats only
        while time.monotonic() < deadline:
            daemon.send(identity, Heartbeat(time.time()))
            if daemon.sock.poll(250):
                assert isinstance(daemon.receive()[1], Heartbeat)
        assert proc.poll() is None
        waiting = group_rss(proc.pid)
        print(f"waiting mlx-lm standby: {waiting / MiB:.1f} MiB")  # for the record
        assert waiting < STANDBY_BOUND, f"a waiting mlx-lm standby holds {waiting / MiB:.1f} MiB"
        daemon.send(identity, Go(2, 2, "", 0))
        _, hello, before = daemon.until(Hello, timeout=120)  # said once the model is loaded and restored
        assert isinstance(hello, Hello) and all(isinstance(m, Heartbeat) for m in before), before
        assert (hello.token, hello.batch, hello.accum, hello.start_step) == (token, 2, 2, 0)
        weights = (large[0] / "model.safetensors").stat().st_size
        loaded = group_rss(proc.pid)
        # The bound above means something: with the weights read, the same process is far over it. (The large
        # model is not trained here: a step of it takes seconds on this CPU; the tiny one steps below.)
        assert loaded > waiting + 0.8 * weights, (loaded / MiB, waiting / MiB, weights / MiB)

    def test_runs_gos_batch_and_accumulation(self, tiny: Tiny, daemon: Daemon) -> None:
        token = secrets.token_hex(16)
        spawn_standby(daemon, tiny, token, iters=4)
        identity, _ = wait_standby(daemon, token)
        daemon.send(identity, Go(2, 2, "", 0))
        _, hello, _ = daemon.until(Hello, timeout=120)
        assert isinstance(hello, Hello) and (hello.batch, hello.accum) == (2, 2)
        steps = []
        while len(steps) < 2:
            daemon.send(identity, Heartbeat(time.time()))
            _, step, _ = daemon.until(Step, timeout=120)
            assert isinstance(step, Step)
            steps.append((step.step, step.batch, step.accum))
        assert steps == [(1, 2, 2), (2, 2, 2)]


class TestRecycleThroughStandby:
    """A leaking mlx-lm fine-tune with ``standby = "auto"`` recycles into its standby and ends bit for bit where
    the same run with ``standby = "off"`` ends."""

    @pytest.mark.timeout(900)
    def test_leak_recycles_through_the_standby_bitwise_equal_to_standby_off(self, tiny: Tiny, config_file: Any,
                                                                            tmp_path: Path, spawn: Any) -> None:
        runs: dict[str, Run] = {}
        for arm in ("auto", "off"):
            work = tmp_path / arm
            work.mkdir()
            spec = {**job(tiny, work, "600MiB", MLXSUP_INJECT_LEAK_MB_PER_STEP="25"), "standby": arm}
            path = config_file({"j": spec}, state_dir=str(work / "state"))  # each arm its own checkpoints
            argv = mlxsupd("run", "-c", str(path), "j", "--summary", str(work / "summary.json"), "--log-format",
                           "json")
            runs[arm] = Run(work, spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)).wait()
        on, off = runs["auto"], runs["off"]
        for run in (on, off):
            assert run.code == 0 and run.summary["outcome"] == "finished"
            assert run.summary["steps_completed"] == ITERS and run.summary["restarts"] >= 1
            assert run.summary["samples_over_budget"] == 0
        gos = [e for e in on.history if e["event"] == "standby_go"]
        assert on.summary["standby"]["used"] == len(gos) >= 1, on.summary["standby"]
        assert off.summary["standby"]["started"] == 0
        # The standby's footprint (sampled by the daemon, counted in the job's total) stays under the bound.
        assert 0 < on.summary["standby"]["max_bytes"] < STANDBY_BOUND, on.summary["standby"]
        print(f"mlx-lm standby: {on.summary['standby']}; recovery median on "
              f"{on.summary['recovery_seconds_median']} s, off {off.summary['recovery_seconds_median']} s")
        assert bitwise_equal(on.final(), off.final())
