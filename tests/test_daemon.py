"""The long-running daemon and its control plane, end to end: real daemon, real workers, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from supervisor.daemon.history import read_history
from tests.conftest import SMALL, mlxsupd

pytestmark = pytest.mark.slow


def two_jobs(**extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "leaky": {"budget": "600MiB", "checkpoint_every": 20, "train": {**SMALL, "steps": 100000,
                                                                        "leak_mb_per_step": 10}},
        "steady": {"budget": "1GiB", "checkpoint_every": 20, "train": {**SMALL, "steps": 100000}},
        **extra,
    }


class Daemon:
    """A running `mlxsupd -c CONFIG` and a way to talk to it with `mlxsupctl`."""

    def __init__(self, spawn: Any, config: Path, tmp_path: Path) -> None:
        self.config = config
        self.tmp_path = tmp_path
        self.log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115
        self.proc = spawn(mlxsupd("-c", str(config), "--log-format", "json"), stdout=self.log, stderr=self.log)
        self.wait(lambda: self.ctl("version").returncode == 0, 30, "daemon answers")

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(self.config), "--json", "--timeout", "3",
                *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def json(self, *args: str) -> Any:
        done = self.ctl(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def states(self) -> dict[str, str]:
        return {j["name"]: j["state"] for j in self.json("status")["jobs"]}

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) while waiting for: {what}\n"
                                     + (self.tmp_path / "daemon.log").read_text()[-3000:])
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for: {what}")

    def history(self, job: str) -> list[dict[str, Any]]:
        return read_history(self.tmp_path / "state" / "jobs" / job / "history.jsonl")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def daemon(spawn: Any, config_file: Any, tmp_path: Path) -> Any:
    started: list[Daemon] = []

    def start(jobs: dict[str, dict[str, Any]] | None = None, **daemon_keys: Any) -> Daemon:
        path = config_file(jobs or two_jobs(), **daemon_keys)
        started.append(Daemon(spawn, path, tmp_path))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def running(d: Daemon, *names: str) -> Callable[[], bool]:
    return lambda: all(d.states().get(n) == "RUNNING" for n in names)


class TestCommands:
    """Every control command against a daemon running two jobs under independent budgets."""

    def test_status_start_stop_restart_checkpoint(self, daemon: Any) -> None:
        d = daemon()
        d.wait(running(d, "leaky", "steady"), 60, "both jobs running")
        jobs = {j["name"]: j for j in d.json("status")["jobs"]}
        assert jobs["leaky"]["budget_bytes"] == 600 * 2**20 and jobs["steady"]["budget_bytes"] == 2**30
        assert d.json("status", "steady")["jobs"][0]["name"] == "steady"
        assert d.json("checkpoint", "steady")["requested"] is True
        d.wait(lambda: any(e["event"] == "checkpoint" for e in d.history("steady")), 30, "checkpoint")
        assert d.json("stop", "steady")["job"] == "steady"
        d.wait(lambda: d.states()["steady"] == "STOPPED", 30, "steady stopped")
        exits = [e for e in d.history("steady") if e["event"] == "exit"]
        assert exits[-1]["code"] == 75  # checkpointed on its way out
        refused = d.ctl("stop", "nope")
        assert refused.returncode == 1 and "no job 'nope'" in refused.stderr
        d.json("start", "steady")
        d.wait(running(d, "steady"), 60, "steady running again")
        assert d.ctl("start", "steady").returncode == 1  # already running: refused with a reason
        before = d.json("status", "steady")["jobs"][0]["pid"]
        d.json("restart", "steady")
        d.wait(lambda: d.json("status", "steady")["jobs"][0]["pid"] not in (None, before)
               and d.states()["steady"] == "RUNNING", 60, "steady restarted with a new pid")

    def test_tail_history_signal_version_help(self, daemon: Any) -> None:
        d = daemon()
        d.wait(running(d, "leaky", "steady"), 60, "both jobs running")
        follow = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(d.config), "tail", "-f",
                                 "steady", "telemetry", "--seconds", "3"], capture_output=True, text=True, timeout=30)
        records = [json.loads(line) for line in follow.stdout.splitlines()]
        assert len(records) >= 3 and all("step" in r and "footprint" in r for r in records)
        steps = [r["step"] for r in records]
        assert steps == sorted(steps)
        # The leaky job recycles about once a second; each worker logs its exit on stderr.
        d.wait(lambda: "worker_exit" in d.json("tail", "leaky", "stderr")["data"], 30, "a recycle in stderr")
        events = d.json("history", "leaky", "-n", "200")["events"]
        assert {"spawn", "state"} <= {e["event"] for e in events}
        assert d.json("signal", "steady", "KILL")["signal"] == "SIGKILL"
        d.wait(lambda: any(e["event"] == "exit" and e["code"] == -9 for e in d.history("steady")), 30, "killed")
        d.wait(running(d, "steady"), 60, "restarted after the kill")
        assert d.ctl("signal", "steady", "BOGUS").returncode == 1
        assert d.json("version")["control_protocol"] == 1
        assert "budget" in d.json("help")["commands"]

    def test_budget_change_takes_effect_on_the_next_sample(self, daemon: Any) -> None:
        d = daemon()
        d.wait(running(d, "steady"), 60, "steady running")
        assert d.json("budget", "steady")["budget_bytes"] == 2**30
        bad = d.ctl("budget", "steady", "lots")
        assert bad.returncode == 1 and "lots" in bad.stderr
        refused = d.ctl("budget", "steady", "20MiB")  # far under what the worker already uses
        assert refused.returncode == 1 and "bad_value" in refused.stderr and "kill ceiling 22.0 MiB" in refused.stderr
        assert d.json("budget", "steady")["budget_bytes"] == 2**30  # unchanged
        assert d.json("budget", "steady", "20MiB", "--force")["budget_bytes"] == 20 * 2**20
        forced = read_history(d.tmp_path / "state" / "audit.jsonl")[-1]
        assert forced["command"] == "budget" and forced["args"]["force"] is True and forced["client"] == "local"
        d.wait(lambda: any(e["event"] == "decision" for e in d.history("steady")), 10, "a decision")
        changed = next(e for e in d.history("steady") if e["event"] == "budget")
        decision = next(e for e in d.history("steady") if e["event"] == "decision")
        assert decision["budget"] == 20 * 2**20
        # The first samples after the change acted on it (20 samples a second; the daemon's own clock).
        assert decision["time"] - changed["time"] < 1.0


class TestRobustness:
    """Malformed requests get error replies and the daemon stays up."""

    def test_malformed_requests(self, daemon: Any, run_dir: Path) -> None:
        d = daemon({"steady": two_jobs()["steady"]})
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{run_dir / 'control.sock'}")
        frames = [
            [b"\xc1\xc1garbage"],
            [msgpack.packb([1, 2, 3])],
            [msgpack.packb({"v": 1, "id": "a", "cmd": 5, "args": {}})],
            [msgpack.packb({"v": 1, "id": "b", "cmd": "launch_missiles", "args": {}})],
            [msgpack.packb({"v": 1, "id": "c", "cmd": "status", "args": {"job": 5}})],
            [msgpack.packb({"v": 1, "id": "d", "cmd": "start", "args": {"job": "../../bin/sh"}})],
            [msgpack.packb({"v": 1, "id": "e", "cmd": "tail", "args": {"job": "steady", "stream": "/etc/passwd"}})],
            [msgpack.packb({"v": 1, "id": "f", "cmd": "status", "args": {"extra": 1}})],
            [msgpack.packb({"v": 1, "id": "g", "cmd": "status", "args": {}, "x": 1})],
            [b"x" * (300 * 1024)],
            [b"a", b"b", b"c"],
        ]
        codes = []
        try:
            for parts in frames:
                sock.send_multipart(parts)
                assert sock.poll(5000), f"no reply to {parts[0][:40]!r}"
                reply = msgpack.unpackb(sock.recv())
                assert reply["ok"] is False and reply["error"]["message"]
                codes.append(reply["error"]["code"])
        finally:
            sock.close()
            ctx.term()
        assert codes[3] == "unknown_command" and codes[5] == "no_such_job" and codes[6] == "bad_value"
        assert d.json("version")["version"]  # still up


class TestReloadAndShutdown:
    """SIGHUP rereads the config; SIGTERM checkpoints every worker before the daemon exits."""

    def test_sighup_adds_and_removes_jobs(self, daemon: Any, config_file: Any) -> None:
        d = daemon()
        d.wait(running(d, "leaky", "steady"), 60, "both running")
        jobs = two_jobs()
        config_file({"steady": jobs["steady"], "fresh": {**jobs["steady"], "budget": "700MiB"}})
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: set(d.states()) == {"steady", "fresh"}, 60, "leaky removed and fresh added")
        d.wait(running(d, "fresh"), 60, "fresh running")
        exits = [e for e in d.history("leaky") if e["event"] == "exit"]
        # Removed after a checkpoint: nothing reported is lost. (A SIGHUP that lands just after a leak recycle
        # finds a worker that has not said hello yet: it is terminated, having done nothing to save.)
        assert exits and max(e["checkpoint"] for e in exits) == max(e["step"] for e in exits)
        # (Such a life took no step: its exit says step 0, and it loses nothing.)
        assert exits[-1]["code"] == 75 or exits[-1]["step"] in (0, exits[-1]["checkpoint"])

    def test_reread_and_update_commands(self, daemon: Any, config_file: Any) -> None:
        d = daemon()
        jobs = two_jobs()
        config_file({**jobs, "third": {**jobs["steady"], "autostart": False}})
        assert d.json("reread") == {"added": ["third"], "removed": [], "changed": []}
        assert "third" not in d.states()
        assert d.json("update")["added"] == ["third"]
        assert d.states()["third"] == "STOPPED"

    def test_sigterm_checkpoints_every_worker_then_exits_zero(self, daemon: Any) -> None:
        d = daemon()
        d.wait(running(d, "leaky", "steady"), 60, "both running")
        time.sleep(1)
        assert d.stop() == 0
        for job in ("leaky", "steady"):
            exits = [e for e in d.history(job) if e["event"] == "exit"]
            # Nothing lost: the newest checkpoint holds the last step any worker reported. (A worker caught
            # before its hello is simply terminated: it had done nothing to save.)
            assert max(e["checkpoint"] for e in exits) == max(e["step"] for e in exits)
        steady_exit = [e for e in d.history("steady") if e["event"] == "exit"][-1]
        assert steady_exit["code"] == 75 and steady_exit["goodbye"] == "daemon shutdown"

    def test_shutdown_command_and_resume_with_history_after_restart(self, daemon: Any, spawn: Any,
                                                                     tmp_path: Path) -> None:
        d = daemon({"steady": two_jobs()["steady"]})
        d.wait(lambda: d.json("status")["jobs"][0]["step"] >= 30, 60, "30 steps")
        assert d.json("shutdown")["shutting_down"] is True
        assert d.proc.wait(timeout=60) == 0
        step = [e for e in d.history("steady") if e["event"] == "exit"][-1]["checkpoint"]
        again = Daemon(spawn, d.config, tmp_path)
        try:
            again.wait(running(again, "steady"), 60, "running after the daemon restart")
            hello = [e for e in again.history("steady") if e["event"] == "spawn"][-1]
            assert hello["from_checkpoint"] == step
            events = again.json("history", "steady", "-n", "1000")["events"]
            assert sum(e["event"] == "spawn" for e in events) == 2  # history survived the restart
        finally:
            assert again.stop() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestAuthentication:
    """TCP control requires CURVE and an authorized key."""

    def test_curve(self, daemon: Any, tmp_path: Path) -> None:
        keys = tmp_path / "keys"
        for name in ("server", "alice", "mallory"):
            subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "keygen", name, "--dir", str(keys)],
                           check=True, capture_output=True, timeout=30)
        assert oct(os.stat(keys / "alice.key_secret").st_mode & 0o777) == "0o600"
        (tmp_path / "authorized").write_text((keys / "alice.key").read_text())
        port = free_port()
        d = daemon({"steady": {**two_jobs()["steady"], "autostart": False}},
                   control={"tcp": f"tcp://127.0.0.1:{port}", "server_key": str(keys / "server.key_secret"),
                            "authorized_keys": str(tmp_path / "authorized")})
        remote = [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-s", f"tcp://127.0.0.1:{port}", "--timeout", "2",
                  "--json"]
        ok = subprocess.run([*remote, "--key", str(keys / "alice.key_secret"), "--server-key",
                             str(keys / "server.key"), "version"], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run([*remote, "--key", str(keys / "mallory.key_secret"), "--server-key",
                                str(keys / "server.key"), "version"], capture_output=True, text=True, timeout=30)
        assert wrong.returncode == 3
        plain = subprocess.run([*remote, "version"], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 3
        # Revoke alice: empty the allow-list and reread.
        (tmp_path / "authorized").write_text("# nobody\n")
        d.json("reread")
        d.json("update")
        revoked = subprocess.run([*remote, "--key", str(keys / "alice.key_secret"), "--server-key",
                                  str(keys / "server.key"), "version"], capture_output=True, text=True, timeout=30)
        assert revoked.returncode == 3

    def test_plain_tcp_is_refused_unless_loopback_and_enabled(self, config_file: Any) -> None:
        port = free_port()
        for control in ({"tcp": f"tcp://127.0.0.1:{port}"},
                        {"tcp": f"tcp://0.0.0.0:{port}", "allow_plaintext_loopback": True}):
            path = config_file({"j": {"autostart": False}}, control=control)
            done = subprocess.run(mlxsupd("-c", str(path)), capture_output=True, text=True, timeout=30)
            assert done.returncode == 2 and "CURVE" in done.stderr


class TestExampleConfig:
    """deploy/mlxsup.example.toml runs as is and shuts down with checkpoints."""

    def test_example_config_runs_both_jobs(self, spawn: Any, tmp_path: Path, run_dir: Path) -> None:
        root = Path(__file__).resolve().parent.parent
        config = root / "deploy" / "mlxsup.example.toml"
        env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(run_dir), "XDG_STATE_HOME": str(tmp_path / "xdg")}
        proc = spawn(mlxsupd("-c", str(config)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctl = [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), "--json"]
        full_env = {**os.environ, **env}
        deadline = time.monotonic() + 90
        states: dict[str, str] = {}
        while time.monotonic() < deadline and set(states.values()) != {"RUNNING"}:
            done = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30, env=full_env)
            if done.returncode == 0:
                states = {j["name"]: j["state"] for j in json.loads(done.stdout)["jobs"]}
            time.sleep(0.5)
        assert states == {"small": "RUNNING", "large": "RUNNING"}
        subprocess.run([*ctl, "shutdown"], check=True, capture_output=True, timeout=30, env=full_env)
        assert proc.wait(timeout=90) == 0
        for job in ("small", "large"):
            history = read_history(tmp_path / "xdg" / "mlx-supervisor" / "jobs" / job / "history.jsonl")
            assert [e for e in history if e["event"] == "exit"][-1]["code"] == 75


class TestServiceRestart:
    """After a daemon restart, jobs that were running continue from their checkpoints, history intact."""

    def test_manually_started_job_resumes_after_daemon_sigkill(self, daemon: Any, spawn: Any, tmp_path: Path) -> None:
        d = daemon({"manual": {**two_jobs()["steady"], "autostart": False, "checkpoint_every": 10}})
        assert d.states() == {"manual": "STOPPED"}
        d.json("start", "manual")
        d.wait(lambda: d.json("status")["jobs"][0]["step"] >= 25, 60, "25 steps")
        d.proc.kill()  # SIGKILL: no goodbye; the orphaned worker checkpoints by itself
        d.proc.wait(timeout=10)
        time.sleep(6)  # the orphan notices within 5 s
        checkpoints = sorted((tmp_path / "state" / "jobs" / "manual" / "checkpoints").glob("ckpt-*"))
        newest = int(checkpoints[-1].name.split("-")[1])
        again = Daemon(spawn, d.config, tmp_path)
        try:
            again.wait(running(again, "manual"), 60, "manual job resumed by the restarted daemon")
            spawned = [e for e in again.history("manual") if e["event"] == "spawn"]
            assert spawned[-1]["from_checkpoint"] == newest >= 25
            assert len(spawned) == 2
        finally:
            assert again.stop() == 0

    def test_daemon_log_file_rotates_and_reopens(self, daemon: Any, tmp_path: Path) -> None:
        d = daemon({"j": {**two_jobs()["steady"], "autostart": False}}, log_file=str(tmp_path / "d.log"),
                   log_max_bytes="1KiB", log_keep=2)

        def cycle() -> None:
            d.json("start", "j")
            d.json("stop", "j")
            d.wait(lambda: d.states()["j"] == "STOPPED", 30, "stopped")

        cycles = 0
        while not (tmp_path / "d.log.1").exists() and cycles < 30:  # until the first rotation
            cycle()
            cycles += 1
        assert (tmp_path / "d.log.1").exists(), f"no rotation after {cycles} start/stop cycles"
        for _ in range(3 * cycles):  # three more rotations' worth: a third old file would be d.log.3
            cycle()
        assert (tmp_path / "d.log.2").exists() and not (tmp_path / "d.log.3").exists()
        os.replace(tmp_path / "d.log", tmp_path / "moved.log")
        d.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        d.json("start", "j")
        d.wait(lambda: (tmp_path / "d.log").exists() and "job_state" in (tmp_path / "d.log").read_text(), 10,
               "log reopened")
        line = (tmp_path / "d.log").read_text().splitlines()[-1]
        assert json.loads(line)["event"]  # JSON lines when not on a terminal


class TestInteractive:
    """The shell answers commands from stdin; top renders a frame with a memory bar."""

    def test_shell_and_top(self, daemon: Any) -> None:
        d = daemon()
        d.wait(running(d, "leaky", "steady"), 60, "both running")
        shell = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(d.config)],
                               input="help\nstatus steady\nbogus\nquit\n", capture_output=True, text=True, timeout=30)
        assert shell.returncode == 0
        assert "checkpoint" in shell.stdout and "steady" in shell.stdout and "RUNNING" in shell.stdout
        top = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(d.config), "top", "--once"],
                             capture_output=True, text=True, timeout=30)
        lines = top.stdout.splitlines()
        assert top.returncode == 0 and lines[0].startswith("JOB")
        leaky = next(line for line in lines if line.startswith("leaky"))
        assert "[" in leaky and "/600.0 MiB" in leaky
