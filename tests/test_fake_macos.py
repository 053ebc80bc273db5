"""The macOS-shaped lane and the darwin branches it exercises: the shape reaches child processes, paths and socket
limits follow the platform, checkpoints use F_FULLFSYNC, and without os.waitid the daemon supervises a leaking job
to completion. Fakes replace only the OS calls (tests/fake_macos/)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import darwin
from protocol.durable import write_durably
from supervisor import paths
from supervisor.config import ConfigError, write_config
from supervisor.daemon.ranks import write_ring
from supervisor.daemon.rundir import RunDirError, ipc_socket, prepare_run_dir
from supervisor.hostfile import build_layout
from tests.conftest import SMALL, mlxsupd
from worker import checkpoint

ROOT = Path(__file__).resolve().parent.parent
LANE = {"MLXSUP_FAKE_MACOS": "1", "PYTHONPATH": str(ROOT / "tests" / "fake_macos")}
IN_LANE = os.environ.get("MLXSUP_FAKE_MACOS") == "1"
LANE_ONLY = "the macOS-shaped lane fakes macOS on Linux: its libSystem fake reads /proc and calls os.waitid"
SHAPE = """
import fcntl, json, os, select
from protocol.darwin import is_macos
from supervisor import paths
from supervisor.daemon.system import exit_probe
print(json.dumps({"waitid": hasattr(os, "waitid"), "waitid_result": hasattr(os, "waitid_result"),
                  "P_PID": getattr(os, "P_PID", None), "WNOWAIT": getattr(os, "WNOWAIT", None),
                  "epoll": hasattr(select, "epoll"), "F_FULLFSYNC": getattr(fcntl, "F_FULLFSYNC", None),
                  "macos": is_macos(), "probe": exit_probe().name, "run_dir": str(paths.default_run_dir()),
                  "limit": paths.socket_path_limit()}))
"""


@pytest.fixture
def fake_darwin_paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process takes the darwin branches (is_macos) with a fake libSystem, restored afterwards."""
    try:
        from fake_libsystem import darwin_selected
    except ImportError:
        from tests.fake_macos.fake_libsystem import darwin_selected
    with darwin_selected():
        yield


@pytest.mark.linux_only(LANE_ONLY)
@pytest.mark.darwin_real("TestLibSystemWaitid::test_this_pythons_exit_probe_supervises_a_straggler")
class TestLaneShape:
    """MLXSUP_FAKE_MACOS=1 plus the sitecustomize on PYTHONPATH makes any Python process look like macOS 3.11."""

    def test_fake_macos_shape_reaches_a_child_process(self, tmp_path: Path) -> None:
        temp = "/var/folders/x1/abcdefghijklmnopqrstuvwxyz0000gn/T/"
        env = {**os.environ, **LANE, "TMPDIR": temp}
        done = subprocess.run([sys.executable, "-c", SHAPE], capture_output=True, text=True, timeout=60, env=env,
                              cwd=ROOT, check=False)
        assert done.returncode == 0, done.stderr
        shape = json.loads(done.stdout)
        # As on macOS CPython 3.11/3.12: waitid missing, its constants present (here with Linux's values, which the
        # darwin paths must never use: they take xnu's from protocol.darwin).
        assert shape == {"waitid": False, "waitid_result": False, "P_PID": os.P_PID, "WNOWAIT": os.WNOWAIT,
                         "epoll": False, "F_FULLFSYNC": 51, "macos": True, "probe": "libSystem waitid (ctypes)",
                         "run_dir": temp + "mlxsup", "limit": 104}
        assert shape["WNOWAIT"] != darwin.WNOWAIT

    @pytest.mark.skipif(not IN_LANE, reason="only inside the macOS-shaped lane (make test-fake-macos)")
    def test_fake_macos_lane_is_active_in_this_process(self) -> None:
        assert not hasattr(os, "waitid") and darwin.is_macos() and darwin.darwin() is not None


@pytest.mark.darwin_real("TestRunDir::test_sun_path_is_104_bytes_with_its_nul")
class TestSocketPathLimit:
    """104 bytes on macOS, 108 on Linux, the terminating NUL included; an error names the path and the limit."""

    @pytest.mark.parametrize("limit", [104, 108])
    def test_limit_counts_the_nul(self, limit: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        if limit == 104:
            request.getfixturevalue("fake_darwin_paths")
        elif darwin.is_macos():
            pytest.skip("Linux's limit is checked outside the lane")
        fits = Path("/" + "x" * (limit - 2))  # limit - 1 bytes + NUL
        assert paths.socket_path_limit() == limit
        assert paths.socket_path_problem(fits) is None
        problem = paths.socket_path_problem(Path(str(fits) + "y"))
        assert problem is not None and f"{limit}-byte limit" in problem and str(fits) + "y" in problem

    def test_config_error_at_load_names_the_socket(self, tmp_path: Path) -> None:
        run_dir = "/tmp/" + "d" * (paths.socket_path_limit() - 16)
        path = write_config(tmp_path / "c.toml", {"run_dir": run_dir}, {})
        from supervisor.config import load_config

        with pytest.raises(ConfigError, match=r"(workers|control|events)\.sock.*byte limit"):
            load_config(path)

    def test_run_dir_error_before_any_bind(self, tmp_path: Path) -> None:
        long = tmp_path / ("d" * max(1, paths.socket_path_limit() - len(str(tmp_path)) - 8))
        with pytest.raises(RunDirError, match="byte limit"):
            prepare_run_dir(long)
        assert not long.exists()  # refused before it was created
        with pytest.raises(ValueError, match="IPC_SOCKETS"):
            ipc_socket(tmp_path, "other.sock")


@pytest.mark.darwin_real("TestRunDir::test_default_run_dir_is_under_tmpdir_and_its_sockets_bind")
class TestDefaultRunDirWithFakeDarwin:
    """macOS: under the per-user $TMPDIR (macOS deletes /tmp entries untouched for 3 days); without it, confstr's
    per-user temp dir, asked by number; failing that ~/Library/Caches/mlxsup/run, or /var/run/mlxsup for root."""

    def test_fake_darwin_run_dir_is_under_tmpdir(self, fake_darwin_paths: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("TMPDIR", "/var/folders/x1/abc/T/")
        assert paths.default_run_dir() == Path("/var/folders/x1/abc/T/mlxsup")

    @pytest.fixture
    def fake_confstr(self, fake_darwin_paths: None, monkeypatch: pytest.MonkeyPatch,
                     run_dir: Path) -> dict[str, Any]:
        """No TMPDIR, HOME in a short private dir, sys.platform "darwin", and a fake os.confstr that fails with
        EINVAL unless given an answer; records what it was asked."""
        fake: dict[str, Any] = {"asked": [], "answer": None}

        def confstr(name: str | int) -> str | None:
            fake["asked"].append(name)
            if fake["answer"] is None:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return str(fake["answer"])

        monkeypatch.delenv("TMPDIR", raising=False)
        monkeypatch.setenv("HOME", str(run_dir))
        monkeypatch.setattr(sys, "platform", "darwin")
        monkeypatch.setattr(os, "confstr", confstr)
        monkeypatch.setattr(os, "confstr_names", {k: v for k, v in os.confstr_names.items() if "DARWIN" not in k})
        return fake

    @pytest.mark.darwin_real("TestRunDir::test_confstr_65537_is_the_per_user_tmpdir")
    def test_fake_confstr_is_asked_by_number_without_tmpdir(self, fake_confstr: dict[str, Any]) -> None:
        fake_confstr["answer"] = "/var/folders/x1/abc/T/"
        assert paths.default_run_dir() == Path("/var/folders/x1/abc/T/mlxsup")
        assert fake_confstr["asked"] == [darwin.CS_DARWIN_USER_TEMP_DIR] == [65537]

    def test_fake_confstr_by_name_once_cpython_lists_it(self, fake_confstr: dict[str, Any],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(os.confstr_names, "CS_DARWIN_USER_TEMP_DIR", 65537)
        fake_confstr["answer"] = "/var/folders/x1/abc/T/"
        assert paths.default_run_dir() == Path("/var/folders/x1/abc/T/mlxsup")
        assert fake_confstr["asked"] == ["CS_DARWIN_USER_TEMP_DIR"]

    def test_fake_confstr_failing_user_gets_library_caches_never_tmp(
            self, fake_confstr: dict[str, Any], monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
        with monkeypatch.context() as user:
            user.setattr(os, "getuid", lambda: 501)
            default = paths.default_run_dir()
        assert default == run_dir / "Library" / "Caches" / "mlxsup" / "run"
        assert fake_confstr["asked"] == [65537]
        prepare_run_dir(default)  # created 0700 with its parents, socket paths within macOS's 104 bytes
        assert default.stat().st_mode & 0o777 == 0o700
        home = Path("/Users/" + "u" * 32)  # a long user name still leaves room for the sockets
        for name in paths.IPC_SOCKETS:
            assert paths.socket_path_problem(home / "Library" / "Caches" / "mlxsup" / "run" / name) is None

    def test_fake_confstr_failing_root_gets_var_run(self, fake_confstr: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "getuid", lambda: 0)
        assert paths.default_run_dir() == Path("/var/run/mlxsup")

    @pytest.mark.skipif(IN_LANE, reason="Linux's defaults are checked outside the lane")
    @pytest.mark.linux_only("Linux's default run dir ($XDG_RUNTIME_DIR)")
    def test_linux_default_unchanged(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
        assert paths.default_run_dir() == Path("/run/user/1000/mlxsup")
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        monkeypatch.delenv("TMPDIR", raising=False)
        assert paths.default_run_dir() == Path(f"/tmp/mlxsup-{os.getuid()}")


@pytest.mark.darwin_real("TestFullFsync::test_durable_write_never_falls_back_to_fsync")
class TestFullFsyncWithFakeFcntl:
    """Checkpoint files and directories go through F_FULLFSYNC, with fsync where it is missing or fails."""

    @pytest.fixture
    def calls(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {"fullfsync": [], "fsync": []}
        real_fsync = os.fsync

        def fake_fcntl(fd: int, cmd: int, arg: int = 0) -> int:
            assert cmd == 51
            if os.environ.get("FAKE_FULLFSYNC_FAILS"):
                raise OSError(errno.ENOTSUP, "not supported")
            seen["fullfsync"].append(fd)
            return 0

        def counting_fsync(fd: int) -> None:
            seen["fsync"].append(fd)
            real_fsync(fd)

        monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)
        monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
        monkeypatch.setattr(os, "fsync", counting_fsync)
        return seen

    def test_fake_fcntl_fullfsync_for_every_file_and_directory(self, calls: dict[str, list[int]],
                                                               tmp_path: Path) -> None:
        import mlx.core as mx

        checkpoint.save_checkpoint(tmp_path / "ck", 1, {"w": mx.zeros((4,))}, {}, {})
        # model, optimizer, meta.json, the temp dir, the parent after the rename, and ck's parent on creation
        assert len(calls["fullfsync"]) >= 6 and calls["fsync"] == []

    def test_fake_fcntl_failure_falls_back_to_fsync(self, calls: dict[str, list[int]], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_FULLFSYNC_FAILS", "1")
        with open(tmp_path / "f", "wb") as fh:
            checkpoint.full_fsync(fh.fileno())
        assert calls["fullfsync"] == [] and len(calls["fsync"]) == 1

    def test_fake_fcntl_fullfsync_for_the_daemons_summary_and_ring_file(self, calls: dict[str, list[int]],
                                                                        tmp_path: Path) -> None:
        layout = build_layout(2, [], None, "", 29000, [])
        assert layout is not None
        write_ring(layout, tmp_path / "gang" / "ring.json", 3)
        write_durably(tmp_path / "summary.json", "{}\n")  # what run_one writes its --summary with
        # each: the file, then its directory after the rename; fsync only where F_FULLFSYNC fails
        assert len(calls["fullfsync"]) == 4 and calls["fsync"] == []
        assert json.loads((tmp_path / "gang" / "ring.json").read_text()) and (tmp_path / "summary.json").read_text()
        assert sorted(p.name for p in tmp_path.rglob("*")) == ["gang", "ring.json", "summary.json"]  # no temp left

    def test_fake_fcntl_failure_in_a_durable_write_falls_back_to_fsync(
            self, calls: dict[str, list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("FAKE_FULLFSYNC_FAILS", "1")
        write_durably(tmp_path / "summary.json", b"{}")
        assert calls["fullfsync"] == [] and len(calls["fsync"]) == 2

    def test_without_the_constant_fsync_is_used(self, calls: dict[str, list[int]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delattr(fcntl, "F_FULLFSYNC")
        with open(tmp_path / "f", "wb") as fh:
            checkpoint.full_fsync(fh.fileno())
        assert len(calls["fsync"]) == 1


@pytest.mark.slow
@pytest.mark.linux_only(LANE_ONLY)
@pytest.mark.darwin_real("TestLibSystemWaitid::test_this_pythons_exit_probe_supervises_a_straggler")
class TestLeakJobWithoutWaitid:
    """`mlxsupd run` on a leaking job, daemon and workers all shaped like macOS CPython 3.11 (fake libSystem)."""

    def test_fake_macos_daemon_supervises_a_leaking_job_to_completion(self, config_file: Any,
                                                                      tmp_path: Path) -> None:
        job = {"budget": "900MiB", "checkpoint_every": 5,
               "train": {**SMALL, "steps": 60, "leak_mb_per_step": 50}}
        path = config_file({"j": job})
        log = tmp_path / "fake-calls.log"
        env = {**os.environ, **LANE, "MLXSUP_FAKE_MACOS_LOG": str(log), "MLXSUP_TEST_MARK": str(tmp_path)}
        summary = tmp_path / "summary.json"
        daemon = subprocess.Popen(mlxsupd("run", "-c", str(path), "j", "--summary", str(summary),
                                          "--log-format", "json"), env=env, cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = daemon.communicate(timeout=240)
        finally:
            daemon.kill()
        assert daemon.returncode == 0, err[-3000:]
        result = json.loads(summary.read_text())
        assert result["outcome"] == "finished" and result["steps_completed"] == 60
        assert result["restarts"] >= 1 and set(result["restart_reasons"]) <= {"leak", "leak_predicted"}
        assert result["max_sampled_bytes"] <= result["budget_bytes"]
        used: dict[str, set[str]] = {}
        for line in log.read_text().splitlines():
            pid, name = line.split()
            used.setdefault(pid, set()).add(name)
        # the daemon's own: the exit probe, the group walk, the footprints, and F_FULLFSYNC for its --summary
        assert {"waitid", "proc_listpgrppids", "proc_pid_rusage", "F_FULLFSYNC"} <= used.pop(str(daemon.pid))
        assert len(used) >= 2 and all("F_FULLFSYNC" in names for names in used.values())  # every worker life
