"""The mlx-lm job kind's standby: where it waits, what it holds, and that a recycle through it stays exact.

A standby successor runs ``python -m worker.mlx_lm`` up to ``worker.mlx_lm.run.ready`` and waits there. That point
must come after the heavy imports (what a standby is for) and before the run reads, seeds or restores anything
(what keeps a resume bitwise, and keeps the model's weights out of the standby's memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._mlx_lm import BASE_OPTIONS, build_tiny, train_in_process

pytestmark = pytest.mark.slow
Tiny = tuple[Path, Path]
PROBE = Path(__file__).parent / "workers" / "mlx_lm_ready_probe.py"
HEAVY = ("mlx.core", "mlx.nn", "mlx.optimizers", "mlx_lm", "mlx_lm.tuner.trainer", "mlx_lm.tuner.datasets",
         "transformers", "zmq", "worker.session")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


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
