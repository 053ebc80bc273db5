"""The shape of a gang from the config: hosts, mlx.launch's hostfile, this daemon's ranks, ring ports, and the
config errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import ConfigError, load_config, write_config
from supervisor.hostfile import LayoutError, build_layout, read_hostfile
from worker.gang import Gang, GangError


@pytest.fixture(autouse=True)
def no_orphans() -> None:
    """Nothing is spawned here."""


class TestLayout:
    """Who runs which rank, and where each generation's ring listens."""

    def test_ranks_on_one_host_are_on_loopback(self) -> None:
        layout = build_layout(2, [], None, "", 32323, [])
        assert layout is not None and layout.local_ranks == (0, 1) and layout.leader and not layout.peers
        assert layout.ring(1) == [["127.0.0.1:32323"], ["127.0.0.1:32324"]]
        assert build_layout(1, [], None, "", 32323, []) is None

    def test_every_generation_listens_on_fresh_ports_within_a_window(self) -> None:
        layout = build_layout(2, [], None, "", 40000, [])
        assert layout is not None
        ports = [tuple(entry[0] for entry in layout.ring(g)) for g in range(1, 17)]
        assert len(set(ports)) == 16 and layout.ring(17) == layout.ring(1)

    def test_hosts_in_rank_order_and_the_local_one_found_by_address(self) -> None:
        layout = build_layout(2, ["10.0.0.1", "10.0.0.2"], None, "", 32323, ["127.0.0.1", "10.0.0.2"])
        assert layout is not None and layout.local_ranks == (2, 3) and not layout.leader
        assert [w for w in range(4) if layout.writer(w)] == [0, 2]  # one writer per host: disks are not shared
        assert layout.ring(1)[2] == ["10.0.0.2:32325"]

    def test_mlx_launch_hostfile_groups_ranks_by_ssh_name(self, tmp_path: Path) -> None:
        path = tmp_path / "hosts.json"
        path.write_text(json.dumps({"backend": "ring", "hosts": [
            {"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac1", "ips": ["10.0.0.1"]},
            {"ssh": "mac2", "ips": ["10.0.0.2"]}]}))
        layout = build_layout(1, [], path, "mac1", 32323, [])
        assert layout is not None and layout.world == 3 and layout.local_ranks == (0, 1)
        assert layout.peers == ("mac2",)

    @pytest.mark.parametrize(("content", "problem"), [
        ("not json", "not JSON"), ("[]", "expected a list of hosts"),
        ('[{"ssh": "mac1"}]', 'needs "ssh" and "ips"'), ('[{"ssh": "m", "ips": ["mac1.local"]}]', "not an IP")])
    def test_a_bad_hostfile_names_the_problem(self, tmp_path: Path, content: str, problem: str) -> None:
        path = tmp_path / "hosts.json"
        path.write_text(content)
        with pytest.raises(LayoutError, match=problem):
            read_hostfile(path)

    def test_this_host_must_be_found(self) -> None:
        with pytest.raises(LayoutError, match=r"set gang\.host"):
            build_layout(1, ["10.0.0.1", "10.0.0.2"], None, "", 32323, ["127.0.0.1"])
        with pytest.raises(LayoutError, match="none of the hosts"):
            build_layout(1, ["10.0.0.1", "10.0.0.2"], None, "10.0.0.9", 32323, [])


def load(tmp_path: Path, job: dict[str, Any], **daemon: Any) -> Any:
    path = write_config(tmp_path / "c.toml", {"run_dir": "/tmp/x", **daemon}, {"j": job})
    return load_config(path, total_memory=16 << 30)


class TestConfig:
    """Gang settings in the config: checked at load, with the key and the problem named."""

    @pytest.mark.parametrize(("job", "daemon", "problem"), [
        ({"ranks": 2, "budget": "9GiB"}, {}, "2 ranks x budget 9GiB do not fit"),
        ({"ranks": 0}, {}, "ranks = 0"),
        ({"hosts": ["10.0.0.1", "10.0.0.2"], "gang": {"host": "10.0.0.2"}}, {}, "set leader, leader_key"),
        ({"hosts": ["10.0.0.1", "10.0.0.2"], "gang": {"host": "10.0.0.1"}}, {}, "set daemon.control.tcp"),
        ({"hosts": ["10.0.0.1"], "hostfile": "h.json"}, {}, "hosts or hostfile, not both"),
        ({"ranks": 2, "command": ["mlx.launch", "--hosts", "a,b", "train.py"]}, {}, "runs mlx.launch"),
        ({"ranks": 2, "command": ["python", "-m", "mlx.launch", "train.py"]}, {}, "runs mlx.launch"),
        ({"ranks": 2, "gang": {"port": 65530}}, {}, "ring ports"),
    ])
    def test_bad_gangs_are_refused(self, tmp_path: Path, job: dict[str, Any], daemon: dict[str, Any],
                                   problem: str) -> None:
        with pytest.raises(ConfigError, match=problem):
            load(tmp_path, job, **daemon)

    def test_a_follower_config_loads(self, tmp_path: Path) -> None:
        config = load(tmp_path, {"hosts": ["10.0.0.1", "10.0.0.2"], "gang": {
            "host": "10.0.0.2", "leader": "tcp://10.0.0.1:7781", "leader_key": "s.key", "client_key": "c.key"}})
        layout = config.layout("j", [])
        assert layout is not None and layout.local_ranks == (1,) and not layout.leader


class TestSdkGang:
    """The SDK reads its place in the gang from the environment."""

    def test_mlx_rank_makes_a_gang_and_rank_0_writes_by_default(self) -> None:
        assert Gang.from_env({}) is None
        gang = Gang.from_env({"MLX_RANK": "0"})
        assert gang is not None and gang.rank == 0 and gang.writer and gang.size == 0
        gang = Gang.from_env({"MLX_RANK": "3", "MLXSUP_RANKS": "4", "MLXSUP_WRITER": "1"})
        assert gang is not None and (gang.rank, gang.size, gang.writer) == (3, 4, True)

    def test_a_bad_rank_names_the_variable(self) -> None:
        with pytest.raises(GangError, match="MLX_RANK='x'"):
            Gang.from_env({"MLX_RANK": "x"})
