"""Tests for worker.checkpoint: round trips, retention, damage fallback, crash safety and disk-full errors."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from protocol import checkpoints as names
from protocol.checkpoints import latest_step, list_checkpoints
from worker import checkpoint as ck
from worker.checkpoint import Checkpoint, CheckpointError, load_latest, save_checkpoint

WRITER = Path(__file__).with_name("_ckpt_writer.py")
# The directory worker.checkpoint was imported from, so subprocesses import the very same module.
IMPORT_ROOT = Path(ck.__file__).parent.parent

Events = list[tuple[str, dict[str, Any]]]
Spawn = Callable[[Path, int], subprocess.Popen[str]]


def same_bits(a: mx.array, b: mx.array) -> bool:
    """Bitwise equality (distinguishes -0.0 from 0.0 and compares NaN payloads), plus dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(mx.array_equal(a.reshape(-1).view(mx.uint8), b.reshape(-1).view(mx.uint8)))


def assert_same_arrays(got: dict[str, mx.array], want: dict[str, mx.array]) -> None:
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert same_bits(got[name], array), name


def arrays_for(step: int) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """Small model/optimizer dicts whose contents identify the step."""
    model = {"l.weight": mx.full((16, 8), float(step)), "l.bias": mx.arange(8, dtype=mx.float16) + step}
    optimizer = {"step": mx.array(step, dtype=mx.uint64), "m": mx.full((16, 8), step / 3)}
    return model, optimizer


def save_step(directory: Path, step: int, keep: int = 3) -> Path:
    model, optimizer = arrays_for(step)
    return save_checkpoint(directory, step, model, optimizer, {"note": f"step {step}"}, keep=keep)


def recorder() -> tuple[Events, Callable[[str, dict[str, Any]], None]]:
    events: Events = []
    return events, lambda event, fields: events.append((event, fields))


def scratch_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def dead_pid() -> int:
    """A pid that belonged to a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


class Trainer:
    """A tiny MLP with AdamW and a fixed batch, stepped deterministically."""

    def __init__(self, seed: int) -> None:
        mx.random.seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
        mx.random.seed(1234)
        self.x, self.y = mx.random.normal((32, 4)), mx.random.normal((32, 2))
        self._grad = nn.value_and_grad(self.model, lambda m, x, y: nn.losses.mse_loss(m(x), y))

    def step(self) -> None:
        _, grads = self._grad(self.model, self.x, self.y)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def flat(self) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
        return dict(tree_flatten(self.model.parameters())), dict(tree_flatten(self.optimizer.state))

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.update(tree_unflatten(list(ckpt.model.items())))
        self.optimizer.state = tree_unflatten(list(ckpt.optimizer.items()))


class TestRoundTrip:
    """Saved arrays and metadata come back bit for bit."""

    def test_model_and_optimizer_round_trip_bitwise(self, tmp_path: Path) -> None:
        trainer = Trainer(seed=0)
        trainer.step()
        model, optimizer = trainer.flat()
        path = save_checkpoint(tmp_path, 1, model, optimizer, {"batch": 32, "extra": {"lr": 0.01}})
        assert path == tmp_path / "ckpt-0000000001"
        names = sorted(p.name for p in path.iterdir())
        assert names == ["meta.json", "model.safetensors", "optimizer.safetensors"]
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.path == path and ckpt.step == 1
        assert_same_arrays(ckpt.model, model)
        assert_same_arrays(ckpt.optimizer, optimizer)
        assert ckpt.meta["batch"] == 32 and ckpt.meta["extra"] == {"lr": 0.01}
        assert ckpt.meta["format"] == 1 and ckpt.meta["step"] == 1
        assert abs(ckpt.meta["created"] - time.time()) < 60
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert ckpt.meta["files"][name]["bytes"] == (path / name).stat().st_size
            assert len(ckpt.meta["files"][name]["sha256"]) == 64

    def test_resumed_optimizer_matches_uninterrupted_run(self, tmp_path: Path) -> None:
        reference = Trainer(seed=0)
        reference.step()
        save_checkpoint(tmp_path, 1, *reference.flat(), {})
        reference.step()
        resumed = Trainer(seed=99)  # different initial weights and an empty optimizer state
        ckpt = load_latest(tmp_path)
        assert ckpt is not None
        shutil.rmtree(ckpt.path)  # arrays must already be in memory
        resumed.restore(ckpt)
        resumed.step()
        assert_same_arrays(resumed.flat()[0], reference.flat()[0])
        assert_same_arrays(resumed.flat()[1], reference.flat()[1])

    def test_empty_optimizer_and_unusual_dtypes(self, tmp_path: Path) -> None:
        model = {
            "bf16": mx.array([1.5, -0.0, float("nan")], dtype=mx.bfloat16),
            "flag": mx.array([True, False]),
            "scalar": mx.array(3.25),
            "empty": mx.zeros((0, 3)),
            "i8": mx.array([-128, 127], dtype=mx.int8),
        }
        save_checkpoint(tmp_path, 5, model, {}, {})
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.optimizer == {}
        assert_same_arrays(ckpt.model, model)

    def test_a_file_with_gaps_between_tensors_is_verified_from_disk_then_loaded(self, tmp_path: Path) -> None:
        """Another writer may leave bytes between tensors: the hash of the file is then taken from disk."""
        path = save_step(tmp_path, 1)
        target = path / "model.safetensors"
        model = arrays_for(1)[0]
        spans, data = {}, b""
        for key, array in model.items():
            raw = bytes(memoryview(array.reshape(-1)))
            spans[key] = {"dtype": {mx.float32: "F32", mx.float16: "F16"}[array.dtype], "shape": list(array.shape),
                          "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw + b"\xee" * 8  # a gap after each tensor
        header = json.dumps(spans).encode()
        target.write_bytes(len(header).to_bytes(8, "little") + header + data)
        meta = json.loads((path / "meta.json").read_text())
        sums = names.checksums(target)
        meta["files"]["model.safetensors"] = {"sha256": sums.sha256, "bytes": sums.size}
        (path / "meta.json").write_text(json.dumps(meta))
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.step == 1
        assert_same_arrays(ckpt.model, model)

    def test_files_we_write_are_read_behind_the_checksum_and_odd_ones_verified_first(self, tmp_path: Path) -> None:
        """The loader copies tensors while the file is checksummed only when the header's tensors fill the file
        exactly (so a damaged header cannot make it allocate more than the file holds)."""
        from worker.safetensors_load import _tensor_ends

        path = save_step(tmp_path, 1)
        for name in ("model.safetensors", "optimizer.safetensors"):
            target = path / name
            ends = _tensor_ends(target, target.stat().st_size)
            assert ends is not None and max(end for _, end in ends.values()) == target.stat().st_size
        claim_a_huge_tensor(path)
        target = path / "model.safetensors"
        assert _tensor_ends(target, target.stat().st_size) is None
        target.write_bytes(b"\xff" * 64)  # a header length past the end of the file
        assert _tensor_ends(target, 64) is None

    def test_rejects_reserved_meta_keys_and_bad_keep(self, tmp_path: Path) -> None:
        model, optimizer = arrays_for(1)
        with pytest.raises(ValueError, match="reserved"):
            save_checkpoint(tmp_path, 1, model, optimizer, {"step": 3})
        with pytest.raises(ValueError, match="keep"):
            save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=0)
        assert list_checkpoints(tmp_path) == []


class TestRetention:
    """Old checkpoints are pruned to `keep`, and a re-saved step replaces the old copy."""

    def test_keeps_last_k(self, tmp_path: Path) -> None:
        for step in range(1, 7):
            save_step(tmp_path, step * 10, keep=3)
        assert [p.name for p in list_checkpoints(tmp_path)] == [f"ckpt-{s:010d}" for s in (40, 50, 60)]
        assert latest_step(tmp_path) == 60
        assert scratch_entries(tmp_path) == []

    def test_keep_one(self, tmp_path: Path) -> None:
        for step in (1, 2, 3):
            save_step(tmp_path, step, keep=1)
        assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000003"]

    def test_same_step_twice_replaces(self, tmp_path: Path) -> None:
        save_step(tmp_path, 1)
        save_step(tmp_path, 2)
        model, optimizer = arrays_for(99)
        save_checkpoint(tmp_path, 2, model, optimizer, {"note": "again"})
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.step == 2 and ckpt.meta["note"] == "again"
        assert_same_arrays(ckpt.model, model)
        assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000001", "ckpt-0000000002"]
        assert scratch_entries(tmp_path) == []

    def test_just_saved_older_step_survives_pruning(self, tmp_path: Path) -> None:
        """PROTOCOL.md 6.3: newer checkpoints (damaged ones the load passed over) are neither counted nor
        removed; the K newest up to the one just written are kept."""
        for step in (5, 10, 20, 30):
            save_step(tmp_path, step)
        save_step(tmp_path, 15, keep=2)  # e.g. resumed from 10 after 20 and 30 were found damaged
        assert [p.name for p in list_checkpoints(tmp_path)] == [
            "ckpt-0000000010", "ckpt-0000000015", "ckpt-0000000020", "ckpt-0000000030"]


def truncate_model(path: Path) -> None:
    target = path / "model.safetensors"
    os.truncate(target, target.stat().st_size // 2)


def flip_byte_optimizer(path: Path) -> None:
    target = path / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x01  # in the tensor data, so the safetensors header still parses: only the hash notices
    target.write_bytes(bytes(data))


def delete_meta(path: Path) -> None:
    (path / "meta.json").unlink()


def garbage_meta(path: Path) -> None:
    (path / "meta.json").write_bytes(b"\x00\xffnot json{")


def meta_without_files(path: Path) -> None:
    meta = json.loads((path / "meta.json").read_text())
    del meta["files"]
    (path / "meta.json").write_text(json.dumps(meta))


def delete_model_file(path: Path) -> None:
    (path / "model.safetensors").unlink()


def _header_end(target: Path) -> int:
    return 8 + int.from_bytes(target.read_bytes()[:8], "little")


def flip_first_tensor_byte(path: Path) -> None:
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[_header_end(target)] ^= 0x80  # the first byte of the first tensor in the file
    target.write_bytes(bytes(data))


def rename_tensor_in_header(path: Path) -> None:
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data.replace(b'"l.bias"', b'"l.bjas"', 1))  # still a valid layout: only the hash notices


def reshape_tensor_in_header(path: Path) -> None:
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes(data.replace(b"[16,8]", b"[99,8]", 1))  # no longer fills its bytes


def flip_header_length(path: Path) -> None:
    target = path / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x04
    target.write_bytes(bytes(data))


def append_byte(path: Path) -> None:
    with open(path / "model.safetensors", "ab") as fh:
        fh.write(b"\0")


def claim_a_huge_tensor(path: Path) -> None:
    """The header says the first tensor has 2**40 elements; the file keeps its size (its data is cut short)."""
    target = path / "model.safetensors"
    data = target.read_bytes()
    end = _header_end(target)
    header = data[8:end].replace(b"[16,8]", b"[1099511627776]", 1)
    target.write_bytes(len(header).to_bytes(8, "little") + header + data[end:len(data) - (len(header) - (end - 8))])
    assert target.stat().st_size == len(data)


DAMAGE = [
    truncate_model, flip_byte_optimizer, delete_meta, garbage_meta, meta_without_files, delete_model_file,
    flip_first_tensor_byte, rename_tensor_in_header, reshape_tensor_in_header, flip_header_length, append_byte,
    claim_a_huge_tensor,
]


class TestDamage:
    """A damaged newest checkpoint is logged, left in place, and skipped for the previous one."""

    @pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
    def test_falls_back_to_previous(self, tmp_path: Path, damage: Callable[[Path], None]) -> None:
        save_step(tmp_path, 1)
        newest = save_step(tmp_path, 2)
        damage(newest)
        events, log = recorder()
        ckpt = load_latest(tmp_path, log=log)
        assert ckpt is not None and ckpt.step == 1
        assert_same_arrays(ckpt.model, arrays_for(1)[0])
        assert len(events) == 1 and events[0][0] == "checkpoint_damaged"
        assert events[0][1]["path"] == str(newest) and events[0][1]["problem"]
        assert newest.is_dir() and latest_step(tmp_path) == 2  # left for the operator

    @pytest.mark.parametrize("damage", [None, flip_byte_optimizer, flip_first_tensor_byte], ids=str)
    def test_without_a_crc32_the_sha256_is_checked(self, tmp_path: Path, damage: Any) -> None:
        """Checkpoints written before the CRC-32 was stored (or by other SDKs) are verified by SHA-256."""
        save_step(tmp_path, 1)
        newest = save_step(tmp_path, 2)
        meta = json.loads((newest / "meta.json").read_text())
        for entry in meta["files"].values():
            del entry["crc32"]
        (newest / "meta.json").write_text(json.dumps(meta))
        if damage is not None:
            damage(newest)
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.step == (2 if damage is None else 1)

    def test_the_checksums_stored_are_those_of_the_files(self, tmp_path: Path) -> None:
        import hashlib
        import zlib

        path = save_step(tmp_path, 1)
        for name, entry in json.loads((path / "meta.json").read_text())["files"].items():
            data = (path / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "crc32": zlib.crc32(data)}

    def test_all_damaged_returns_none_after_logging_each(self, tmp_path: Path) -> None:
        paths = [save_step(tmp_path, step) for step in (1, 2, 3)]
        for path, damage in zip(paths, (truncate_model, delete_meta, flip_byte_optimizer), strict=True):
            damage(path)
        events, log = recorder()
        assert load_latest(tmp_path, log=log) is None
        assert [fields["path"] for _, fields in events] == [str(p) for p in reversed(paths)]
        assert all(p.is_dir() for p in paths)

    def test_missing_or_empty_directory(self, tmp_path: Path) -> None:
        assert load_latest(tmp_path / "nope") is None
        assert load_latest(tmp_path) is None


class TestListing:
    """latest_step and list_checkpoints go by name, ignore scratch and garbage, and need no mlx."""

    def test_ignores_scratch_and_garbage(self, tmp_path: Path) -> None:
        save_step(tmp_path, 3)
        save_step(tmp_path, 12)
        for name in (".tmp-ckpt-99-1-abcd", ".trash-ckpt-98-1-abcd", "ckpt-99", "ckpt-000000009x", "notes"):
            (tmp_path / name).mkdir()
        (tmp_path / "ckpt-0000000077").write_text("a file, not a checkpoint")
        assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000000003", "ckpt-0000000012"]
        assert latest_step(tmp_path) == 12
        assert list_checkpoints(tmp_path / "missing") == [] and latest_step(tmp_path / "missing") is None

    def test_listing_does_not_import_mlx(self, tmp_path: Path) -> None:
        save_step(tmp_path, 4)
        where = f"Path({str(tmp_path)!r})"
        probe = (
            "import importlib.util, sys\n"
            "from pathlib import Path\n"
            f"spec = importlib.util.spec_from_file_location('ckpt_probe', {names.__file__!r})\n"
            "mod = importlib.util.module_from_spec(spec); sys.modules['ckpt_probe'] = mod\n"
            "spec.loader.exec_module(mod)\n"
            f"print(mod.latest_step({where}), len(mod.list_checkpoints({where})))\n"
            "assert 'mlx' not in sys.modules, 'mlx was imported'\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert out.stdout.split() == ["4", "1"]


class TestScratchCleanup:
    """Leftovers of dead writers are removed; a step lost mid-replacement is restored."""

    def test_dead_writers_scratch_removed_live_ones_kept(self, tmp_path: Path) -> None:
        save_step(tmp_path, 1)
        dead, live = dead_pid(), os.getppid()
        for name in (f".tmp-ckpt-2-{dead}-aa", f".prune-ckpt-0-{dead}-bb", f".tmp-ckpt-2-{live}-cc"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        assert load_latest(tmp_path) is not None
        assert scratch_entries(tmp_path) == [f".tmp-ckpt-2-{live}-cc"]
        save_step(tmp_path, 2)
        assert scratch_entries(tmp_path) == [f".tmp-ckpt-2-{live}-cc"]

    def test_trash_restored_when_replacement_never_landed(self, tmp_path: Path) -> None:
        save_step(tmp_path, 1)
        path = save_step(tmp_path, 2)
        dead = dead_pid()
        path.rename(tmp_path / f".trash-ckpt-2-{dead}-dd")  # killed between the two renames of a re-save
        (tmp_path / f".tmp-ckpt-2-{dead}-ee").mkdir()
        ckpt = load_latest(tmp_path)
        assert ckpt is not None and ckpt.step == 2
        assert scratch_entries(tmp_path) == []


def mount_tmpfs(mountpoint: Path, size: str) -> str | None:
    """Mount a size-limited tmpfs; return why not if that is impossible here."""
    if shutil.which("mount") is None:
        return "no mount command"
    mountpoint.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else f"cannot mount tmpfs: {result.stderr.strip()}"


class TestWriteErrors:
    """A failed write raises CheckpointError, removes its temp dir and leaves older checkpoints intact."""

    @pytest.mark.linux_only("mounts a size-limited tmpfs (macOS has none)")
    def test_disk_full(self, tmp_path: Path) -> None:
        disk = tmp_path / "disk"
        reason = mount_tmpfs(disk, "2m")
        if reason is not None:
            pytest.skip(reason)
        try:
            save_step(disk, 1)
            big = {"w": mx.zeros((1024, 1024))}  # 4 MiB on a 2 MiB filesystem
            with pytest.raises(CheckpointError) as raised:
                save_checkpoint(disk, 2, big, {}, {})
            assert str(disk / "ckpt-0000000002") in str(raised.value)
            assert scratch_entries(disk) == []
            ckpt = load_latest(disk)
            assert ckpt is not None and ckpt.step == 1
            assert_same_arrays(ckpt.model, arrays_for(1)[0])
            assert save_step(disk, 3).is_dir()  # the failed attempt freed its space
        finally:
            if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)

    def test_directory_is_a_file(self, tmp_path: Path) -> None:
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        with pytest.raises(CheckpointError, match="blocker"):
            save_step(blocker / "ckpts", 1)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start checkpoint writers in their own session; whatever happens, kill and reap them all."""
    procs: list[subprocess.Popen[str]] = []

    def start(directory: Path, floats: int) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(IMPORT_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, str(WRITER), str(directory), str(floats)], env=env,
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_line(proc: subprocess.Popen[str], prefix: str, timeout: float = 20.0) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([proc.stdout], [], [], left)[0]:
            line = proc.stdout.readline()
            assert line, f"writer exited with {proc.wait()} before printing {prefix!r}"
            if line.startswith(prefix):
                return
    pytest.fail(f"writer printed no {prefix!r} within {timeout}s")


class TestCrashSafety:
    """SIGKILL at random moments never leaves the directory without a verified checkpoint."""

    @pytest.mark.timeout(90)
    def test_sigkill_during_saves(self, tmp_path: Path, spawn: Spawn) -> None:
        rng = random.Random(os.getpid())
        floats = 12_000_000  # 48 MB model + 24 MB optimizer per checkpoint
        steps_seen = []
        for life in range(10):
            proc = spawn(tmp_path, floats)
            wait_for_line(proc, "saved" if life == 0 else "ready")
            time.sleep(rng.uniform(0.0, 0.8))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            events, log = recorder()
            ckpt = load_latest(tmp_path, log=log)
            assert events == [], events
            assert ckpt is not None
            assert ckpt.step == latest_step(tmp_path)
            weight, moment = ckpt.model["layer.weight"], ckpt.optimizer["state.m"]
            assert weight.size == floats and bool(mx.all(weight == ckpt.step))
            assert bool(mx.all(moment == ckpt.step)) and ckpt.optimizer["step"].item() == ckpt.step
            assert scratch_entries(tmp_path) == []  # the dead writer's temp or trash dir was cleaned up
            steps_seen.append(ckpt.step)
        assert steps_seen == sorted(steps_seen)
