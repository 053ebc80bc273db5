"""A gang over two "hosts": two network namespaces joined by a veth pair, one mlxsupd in each, the ring between
them. The daemon of rank 0 leads over its CURVE-authenticated TCP control endpoint; the other follows.

Needs root (``ip netns``); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import write_config
from supervisor.daemon.history import read_history
from tests.gangs import TRAIN, same_weights, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.linux_only("needs Linux network namespaces (ip netns)")]
ADDRESSES = ("10.213.0.1", "10.213.0.2")
CONTROL_PORT = 7791
FINAL = f"ckpt-{TRAIN['steps']:010d}"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)


class Net:
    """Two namespaces, A (rank 0, the leader) and B, joined by a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.names = (f"mlxsupA{tag}", f"mlxsupB{tag}")
        self.links = (f"vA{tag}", f"vB{tag}")

    def create(self) -> str:
        """'' when made, else why not."""
        if shutil.which("ip") is None:
            return "no `ip` command"
        if os.geteuid() != 0:
            return "network namespaces need root"
        for name in self.names:
            made = _ip("netns", "add", name)
            if made.returncode != 0:
                return f"ip netns add failed: {made.stderr.strip()}"
        steps = [("link", "add", self.links[0], "type", "veth", "peer", "name", self.links[1])]
        for name, link, address in zip(self.names, self.links, ADDRESSES, strict=True):
            steps += [("link", "set", link, "netns", name),
                      ("-n", name, "addr", "add", f"{address}/24", "dev", link),
                      ("-n", name, "link", "set", link, "up"), ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                return f"ip {' '.join(step)} failed: {done.stderr.strip()}"
        return ""

    def link(self, up: bool) -> None:
        done = _ip("-n", self.names[0], "link", "set", self.links[0], "up" if up else "down")
        assert done.returncode == 0, done.stderr

    def destroy(self) -> None:
        for name in self.names:
            _ip("netns", "delete", name)  # deletes the veth pair with it


@pytest.fixture
def net() -> Iterator[Net]:
    made = Net()
    problem = made.create()
    if problem:
        made.destroy()
        pytest.skip(f"cannot make network namespaces: {problem}")
    yield made
    made.destroy()


def keys(directory: Path) -> None:
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(directory, "server")
    zmq.auth.create_certificates(directory, "follower")
    public, _ = zmq.auth.load_certificate(directory / "follower.key")
    (directory / "authorized_keys").write_text(public.decode() + "\n")


def configs(tmp_path: Path, job: dict[str, Any]) -> tuple[Path, Path]:
    """The leader's and the follower's config: the same job, each daemon with its own dirs."""
    keys(tmp_path / "keys")
    job = {"hosts": list(ADDRESSES), "ranks": 1, "batch": 4, "checkpoint_every": 6, "budget": "1GiB",
           "startup_timeout": 60.0, "hang_timeout": 20.0, "kill_grace": 1.0, "backoff_initial": 0.2, **job,
           "train": {**TRAIN, **job.get("train", {})}}
    paths = []
    for side in ("a", "b"):
        run_dir = Path(f"/tmp/mlxsup-n{side}{os.getpid() % 100000}")
        shutil.rmtree(run_dir, ignore_errors=True)
        daemon: dict[str, Any] = {"run_dir": str(run_dir), "state_dir": str(tmp_path / side)}
        gang: dict[str, Any] = {"port": 33000}
        if side == "a":
            daemon["control"] = {"tcp": f"tcp://{ADDRESSES[0]}:{CONTROL_PORT}",
                                 "server_key": str(tmp_path / "keys" / "server.key_secret"),
                                 "authorized_keys": str(tmp_path / "keys" / "authorized_keys")}
        else:
            gang.update(leader=f"tcp://{ADDRESSES[0]}:{CONTROL_PORT}",
                        leader_key=str(tmp_path / "keys" / "server.key"),
                        client_key=str(tmp_path / "keys" / "follower.key_secret"))
        paths.append(write_config(tmp_path / f"{side}.toml", daemon, {"j": {**job, "gang": gang}}))
    return paths[0], paths[1]


class Hosts:
    """The two daemons of a test, started in their namespaces."""

    def __init__(self, net: Net, tmp_path: Path, spawn: Any, job: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.net, self.spawn = net, spawn
        self.configs = configs(tmp_path, job)
        self.daemons = [self._start(i) for i in (0, 1)]

    def _start(self, index: int) -> Any:
        side = "ab"[index]
        with open(self.tmp_path / f"{side}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            return self.spawn(["ip", "netns", "exec", self.net.names[index], sys.executable, "-m",
                               "supervisor.cli.mlxsupd", "-c", str(self.configs[index]), "--log-format", "json"],
                              stdout=subprocess.DEVNULL, stderr=log)

    def restart_follower(self) -> None:
        self.daemons[1] = self._start(1)

    def history(self, side: str) -> list[dict[str, Any]]:
        return read_history(self.tmp_path / side / "jobs" / "j" / "history.jsonl")

    def states(self, side: str) -> list[str]:
        return [e["new"] for e in self.history(side) if e["event"] == "state"]

    def wait_finished(self, timeout: float = 240) -> None:
        for side in "ab":
            wait_for(lambda s=side: self.states(s)[-1:] == ["FINISHED"] or self._died(),  # type: ignore[misc]
                     f"host {side} finished", timeout)
            assert not self._died(), "a daemon exited"

    def _died(self) -> bool:
        return any(d.poll() is not None for d in self.daemons)

    def final(self, side: str) -> Path:
        return self.tmp_path / side / "jobs" / "j" / "checkpoints" / FINAL

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            daemon.wait(timeout=30)


def mlxsupctl(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), *args]


def running_ranks(namespace: str, config: Path, ranks: int = 2) -> dict[str, Any] | None:
    """Job j's status from the daemon in ``namespace``, once ``ranks`` of its ranks are running."""
    import json

    done = subprocess.run(["ip", "netns", "exec", namespace, *mlxsupctl(config, "--json", "status", "j")],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        return None
    [row] = json.loads(done.stdout)["jobs"]
    running = [r for r in row.get("ranks", []) if r["state"] == "running"]
    return row if len(running) == ranks else None


class TestTwoHosts:
    """Normal run, a leak-driven stop on the follower's rank, and a partition longer than hang_timeout."""

    def test_normal_run_finishes_with_the_same_weights_on_both_hosts(self, net: Net, tmp_path: Path,
                                                                      spawn: Any) -> None:
        hosts = Hosts(net, tmp_path, spawn, {"train": {"step_sleep": 0.1}})
        leader = wait_for(lambda: running_ranks(net.names[0], tmp_path / "a.toml"), "both ranks in the leader's status")
        assert [(r["rank"], r["host"]) for r in leader["ranks"]] == [(0, ADDRESSES[0]), (1, ADDRESSES[1])]
        assert leader["gang"]["world"] == 2 and leader["gang"]["leader"] is True
        follower = wait_for(lambda: running_ranks(net.names[1], tmp_path / "b.toml", 1), "the follower's status")
        assert follower["gang"]["leader_heard_seconds_ago"] is not None and follower["gang"]["leader"] is False
        text = subprocess.run(["ip", "netns", "exec", net.names[0], *mlxsupctl(tmp_path / "a.toml", "status", "j")],
                              capture_output=True, text=True, timeout=30).stdout
        assert "gang: 2 ranks" in text and f"rank 1@{ADDRESSES[1]}" in text
        hosts.wait_finished()
        hosts.stop()
        assert same_weights(hosts.final("a"), hosts.final("b"))  # each host's writer holds the gang's model
        spawns = [e for e in hosts.history("a") if e["event"] == "spawn"]
        assert [(s["rank"], s["life"]) for s in spawns] == [(0, 1)]
        assert any(e["event"] == "gang_join" and e["gen"] == 1 for e in hosts.history("b"))

    def test_leak_on_the_followers_rank_stops_both_hosts_at_one_step(self, net: Net, tmp_path: Path,
                                                                       spawn: Any) -> None:
        hosts = Hosts(net, tmp_path, spawn, {"budget": "400MiB", "train": {"leak_mb_per_step": 20,
                                                                           "fault_rank": 1}})
        hosts.wait_finished()
        hosts.stop()
        decisions = [e for e in hosts.history("b") if e["event"] == "decision" and e["action"] == "checkpoint_exit"]
        assert decisions and all(d["rank"] == 1 for d in decisions)  # the follower's policy decided
        stops = [e["steps"] for e in hosts.history("a") if e["event"] == "gang_stop"]
        assert stops and all(len(steps) == 2 and len(set(steps)) == 1 for steps in stops)
        assert any(e["event"] == "restart" for e in hosts.history("a"))
        assert same_weights(hosts.final("a"), hosts.final("b"))

    def test_link_down_beyond_hang_timeout_ends_in_a_gang_restart(self, net: Net, tmp_path: Path,
                                                                   spawn: Any) -> None:
        hang = 3.0
        hosts = Hosts(net, tmp_path, spawn, {"hang_timeout": hang, "train": {"step_sleep": 0.05}})
        wait_for(lambda: any(e["event"] == "checkpoint" and e["step"] >= 12 for e in hosts.history("a")),
                 "a checkpoint at step 12")
        net.link(up=False)
        wait_for(lambda: "STARTING" in hosts.states("b")[-1:], "the follower's ranks killed as hung", 30)
        time.sleep(1.0)
        assert hosts.states("a")[-1] == "STOPPING"  # the leader waits for the follower's report
        net.link(up=True)
        hosts.wait_finished()
        hosts.stop()
        history = hosts.history("a")
        assert any(e["event"] == "kill" and "hung" in e["reason"] for e in history)
        assert any(e["event"] == "gang_waiting" and e["hosts"] == [ADDRESSES[1]] for e in history)
        restarts = [e for e in history if e["event"] == "spawn"]
        assert len(restarts) == 2  # one gang restart, after the hosts saw each other again
        assert same_weights(hosts.final("a"), hosts.final("b"))

    def test_a_follower_daemon_that_shuts_down_tells_the_leader(self, net: Net, tmp_path: Path, spawn: Any) -> None:
        import json

        hosts = Hosts(net, tmp_path, spawn, {"train": {"step_sleep": 0.1}})
        wait_for(lambda: any(e["event"] == "checkpoint" and e["step"] >= 6 for e in hosts.history("a")),
                 "a checkpoint at step 6")
        hosts.daemons[1].terminate()  # SIGTERM: its rank checkpoints (with rank 0, at one step), then it leaves
        assert hosts.daemons[1].wait(timeout=60) == 0
        [shutdown] = wait_for(lambda: [e for e in hosts.history("a") if e["event"] == "gang_host_shutdown"],
                              "the leader told of the follower's shutdown", 10)
        assert shutdown["host"] == ADDRESSES[1]
        lines = [json.loads(line) for line in (tmp_path / "b.log").read_text().splitlines() if line.startswith("{")]
        assert [e["answered"] for e in lines if e.get("event") == "gang_farewell"] == [True]
        wait_for(lambda: hosts.states("a")[-1:] == ["STARTING"], "the leader waiting for host b", 10)
        assert "STOPPING" not in hosts.states("a")  # no rank was killed, nothing timed out
        stops = [e["steps"] for e in hosts.history("a") if e["event"] == "gang_stop"]
        assert len(stops) == 1 and len(set(stops[0])) == 1
        hosts.restart_follower()
        hosts.wait_finished()
        hosts.stop()
        assert same_weights(hosts.final("a"), hosts.final("b"))
