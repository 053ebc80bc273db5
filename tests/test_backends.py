"""A gang's backend (ring, mpi, jaccl): the config refuses what cannot work, naming it, and each rank is given what
MLX documents for its backend. JACCL needs Thunderbolt RDMA, which no machine of this suite has: its ranks here are
fakes that record what they were given and then train over the ring."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.backends import rank_env, write_files
from supervisor.config import Config, ConfigError, load_config, write_config
from tests.conftest import ROOT
from tests.gangs import TRAIN, finish, free_port_base, gang_job, history, rank_pid, start

MESH = [[None, "rdma_en2"], ["rdma_en3", None]]


def config_of(tmp_path: Path, run_dir: Path, job: dict[str, Any], **daemon: Any) -> Config:
    path = write_config(tmp_path / "mlxsup.toml", {"run_dir": str(run_dir), "state_dir": str(tmp_path / "s"),
                                                    **daemon}, {"j": {"budget": "1GiB", **job}})
    return load_config(path)


def refused(tmp_path: Path, run_dir: Path, job: dict[str, Any], **daemon: Any) -> str:
    with pytest.raises(ConfigError) as info:
        config_of(tmp_path, run_dir, job, **daemon)
    return str(info.value)


def hostfile(tmp_path: Path, rdma: list[Any] | None = None, **top: Any) -> str:
    """An mlx.distributed_config-style hostfile of two ranks on this host (a fake mesh)."""
    rows = rdma if rdma is not None else MESH
    hosts = [{"ssh": "local", "ips": ["127.0.0.1"], "rdma": row} for row in rows]
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"hosts": hosts, **top}))
    return str(path)


def devices(tmp_path: Path, matrix: Any) -> str:
    path = tmp_path / "devices.json"
    path.write_text(matrix if isinstance(matrix, str) else json.dumps(matrix))
    return str(path)


class TestBackendConfig:
    """backend = ... is checked at load, with messages that name the problem."""

    def test_an_unknown_backend_is_refused_with_the_known_ones(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "nccl"})
        assert "backend = 'nccl': expected one of ring, mpi, jaccl" in message

    def test_a_backend_on_a_plain_job_is_refused(self, tmp_path: Path, run_dir: Path) -> None:
        assert "a backend applies to a gang" in refused(tmp_path, run_dir, {"backend": "mpi"})

    def test_mpi_across_hosts_is_refused(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"hosts": ["127.0.0.1", "10.9.9.9"], "backend": "mpi"})
        assert "backend = \"mpi\" runs the ranks of one host" in message

    def test_mpi_without_mpirun_says_how_to_install_it(self, tmp_path: Path, run_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PATH", str(tmp_path))
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "mpi"})
        assert "needs Open MPI's mpirun on PATH" in message and "apt-get install openmpi-bin" in message

    def test_jaccl_without_devices_names_both_ways_to_give_them(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl"})
        assert "mlx.distributed_config --backend jaccl" in message and "MLX_IBV_DEVICES" in message

    @pytest.mark.parametrize(("matrix", "problem"), [
        ([[None, "a"]], "needs 2 rows, one per rank (got 1)"),
        ([[None, "a"], ["b"]], "rank 1's devices need 2 entries"),
        ([["a", "b"], ["c", None]], "rank 0's entry for itself must be null"),
        ([[None, None], ["c", None]], "rank 0 has no device to rank 1"),
        ([[None, 7], ["c", None]], "rank 0 -> 1: 7 is not a device name"),
        ("[[null, ", "not JSON"),
    ])
    def test_a_bad_device_matrix_is_refused(self, tmp_path: Path, run_dir: Path, matrix: Any, problem: str) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl",
                                              "env": {"MLX_IBV_DEVICES": devices(tmp_path, matrix)}})
        assert problem in message and "MLX_IBV_DEVICES" in message

    def test_a_missing_device_file_is_named(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl", "env": {"MLX_IBV_DEVICES": "no.json"}})
        assert str(tmp_path / "no.json") in message

    def test_jaccls_ring_variant_needs_only_the_neighbours(self, tmp_path: Path, run_dir: Path) -> None:
        ring = [[None, "a", None, "b"], ["a", None, "b", None], [None, "a", None, "b"], ["a", None, "b", None]]
        job = {"ranks": 4, "backend": "jaccl", "env": {"MLX_IBV_DEVICES": devices(tmp_path, ring)}}
        assert "rank 0 has no device to rank 2" in refused(tmp_path, run_dir, job)  # a mesh needs every pair
        config_of(tmp_path, run_dir, {**job, "env": {**job["env"], "MLX_JACCL_RING": "1"}})

    @pytest.mark.parametrize("value", ["localhost:32323", "10.0.0.1", "10.0.0.1:99999", "10.0.0.1:x"])
    def test_a_bad_coordinator_is_refused(self, tmp_path: Path, run_dir: Path, value: str) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl", "hostfile": hostfile(tmp_path),
                                              "env": {"MLX_JACCL_COORDINATOR": value}})
        assert f"MLX_JACCL_COORDINATOR = {value!r}: expected rank 0's IP address and a port" in message

    def test_a_bad_ring_flag_is_refused(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl", "hostfile": hostfile(tmp_path),
                                              "env": {"MLX_JACCL_RING": "yes"}})
        assert "MLX_JACCL_RING = 'yes'" in message

    def test_a_hostfile_written_for_another_backend_is_refused(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"hostfile": hostfile(tmp_path, backend="jaccl")})
        assert "is written for backend 'jaccl', the job says backend = 'ring'" in message

    def test_a_jaccl_hostfile_entry_without_an_ip_says_why_one_is_needed(self, tmp_path: Path,
                                                                       run_dir: Path) -> None:
        path = tmp_path / "mesh.json"
        path.write_text(json.dumps([{"ssh": "mac1", "ips": ["127.0.0.1"], "rdma": [None, "rdma_en2"]},
                                    {"ssh": "mac2", "ips": [], "rdma": ["rdma_en2", None]}]))
        message = refused(tmp_path, run_dir, {"hostfile": str(path), "backend": "jaccl"})
        assert "entry 1 needs \"ssh\" and \"ips\"" in message and "JACCL too needs an IP per host" in message

    def test_bad_hostfile_envs_are_refused(self, tmp_path: Path, run_dir: Path) -> None:
        message = refused(tmp_path, run_dir, {"hostfile": hostfile(tmp_path, envs=["NOEQUALS"]), "backend": "jaccl"})
        assert "envs entry 'NOEQUALS' is not NAME=value" in message


class TestJacclEnvironment:
    """Each rank gets MLX_RANK, MLX_JACCL_COORDINATOR, MLX_IBV_DEVICES (and MLX_JACCL_RING) as MLX documents."""

    def test_a_distributed_config_hostfile_becomes_each_ranks_environment(self, tmp_path: Path,
                                                                         run_dir: Path) -> None:
        config = config_of(tmp_path, run_dir, {"backend": "jaccl", "gang": {"port": 40000},
                                               "hostfile": hostfile(tmp_path, backend="jaccl-ring",
                                                                    envs=["MLX_METAL_FAST_SYNCH=1"])})
        from supervisor.backends import resolve_backend

        layout = config.layout("j")
        assert layout is not None
        job = config.jobs["j"]
        backend = resolve_backend(job.backend, layout, job.hostfile, job.env)
        write_files(backend, tmp_path / "files")
        first, third = (rank_env(backend, layout, life, tmp_path / "files") for life in (1, 3))
        assert first["MLX_JACCL_COORDINATOR"] == "127.0.0.1:40000"
        assert third["MLX_JACCL_COORDINATOR"] == "127.0.0.1:40004"  # a fresh port each generation, as the ring's
        assert first["MLX_JACCL_RING"] == "1" and first["MLX_METAL_FAST_SYNCH"] == "1"
        assert first["MLXSUP_BACKEND"] == "jaccl"
        assert json.loads(Path(first["MLX_IBV_DEVICES"]).read_text()) == MESH

    def test_a_configured_coordinator_is_passed_as_given(self, tmp_path: Path, run_dir: Path) -> None:
        from supervisor.backends import resolve_backend

        config = config_of(tmp_path, run_dir, {"ranks": 2, "backend": "jaccl", "env": {
            "MLX_JACCL_COORDINATOR": "10.1.2.3:5000", "MLX_IBV_DEVICES": devices(tmp_path, MESH)}})
        layout, job = config.layout("j"), config.jobs["j"]
        assert layout is not None
        backend = resolve_backend(job.backend, layout, job.hostfile, job.env)
        assert rank_env(backend, layout, 2, tmp_path)["MLX_JACCL_COORDINATOR"] == "10.1.2.3:5000"
        assert "MLX_JACCL_RING" not in rank_env(backend, layout, 2, tmp_path)


class TestJacclGangFake:
    """A JACCL gang under the real daemon, its ranks fakes: what each rank is given, in every generation."""

    def test_fake_jaccl_ranks_get_their_environment_and_a_fresh_coordinator_after_a_restart(
            self, config_file: Any, tmp_path: Path, spawn: Any) -> None:
        from worker.cli import train_argv

        out = tmp_path / "seen"
        out.mkdir()
        port = free_port_base()
        job = gang_job(port, backend="jaccl", hostfile=hostfile(tmp_path, envs=["MLX_METAL_FAST_SYNCH=1"]),
                       command=[sys.executable, str(ROOT / "tests" / "workers" / "fake_jaccl.py"), str(out),
                                *train_argv({**TRAIN, "step_sleep": 0.05})],
                       env={"PYTHONPATH": str(ROOT)})
        del job["ranks"], job["train"]
        daemon = start(spawn, config_file({"j": job}), tmp_path / "summary.json")
        os.kill(rank_pid(tmp_path, 1, after_checkpoint=12), signal.SIGKILL)
        summary = finish(daemon, tmp_path / "summary.json")
        assert summary["outcome"] == "finished" and summary["restarts"] == 1
        seen = {rank: [json.loads(line) for line in (out / f"rank-{rank}.jsonl").read_text().splitlines()]
                for rank in (0, 1)}
        assert [len(lives) for lives in seen.values()] == [2, 2]  # both generations of both ranks
        for rank, lives in seen.items():
            for life, record in enumerate(lives, start=1):
                assert record["MLX_RANK"] == str(rank) and record["MLXSUP_BACKEND"] == "jaccl"
                assert record["devices"] == MESH and record["MLX_METAL_FAST_SYNCH"] == "1"
                assert record["MLX_HOSTFILE"] is None  # or a script's mx.distributed.init() would take the ring
                assert record["MLX_JACCL_COORDINATOR"] == f"127.0.0.1:{port + (life - 1) * 2}"
        assert {e["rank"] for e in history(tmp_path) if e["event"] == "spawn"} == {0, 1}


class TestMpiEnvironmentFile:
    """A rank loads its MPI environment from the rendezvous' file, or says where it looked."""

    def test_the_open_mpi_and_pmix_lines_are_loaded_and_the_pid_is_left_for_the_placeholder(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from worker.mpi_env import load_mpi_env

        path = tmp_path / "env.1"
        path.write_text("PMIX_RANK=1\nOMPI_COMM_WORLD_SIZE=2\nPATH=/nowhere\nnot a line\n")
        for name in ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE"):  # put back as they were after the test
            monkeypatch.setenv(name, "before")
        assert load_mpi_env(str(path)) == {"PMIX_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}
        assert os.environ["PMIX_RANK"] == "1" and os.environ["PATH"] != "/nowhere"
        assert (tmp_path / "env.1.pid").read_text() == str(os.getpid())

    def test_no_file_in_time_names_the_file_and_mpiruns_log(self, tmp_path: Path) -> None:
        from worker.mpi_env import MpiEnvError, load_mpi_env

        with pytest.raises(MpiEnvError, match=r"no MPI environment at .*env\.0 after 0 s: did mpirun start\?"):
            load_mpi_env(str(tmp_path / "env.0"), wait=0.05)

    def test_a_file_without_pmix_rank_is_refused(self, tmp_path: Path) -> None:
        from worker.mpi_env import MpiEnvError, load_mpi_env

        (tmp_path / "env.0").write_text("OMPI_X=1\n")
        with pytest.raises(MpiEnvError, match="holds no PMIX_RANK"):
            load_mpi_env(str(tmp_path / "env.0"))


class TestRendezvousSweep:
    """Rendezvous directories of gone daemons are removed once none of their ranks lives; others are kept."""

    def test_only_directories_of_gone_daemons_without_live_ranks_are_swept(self, tmp_path: Path) -> None:
        import subprocess

        from supervisor.daemon.backends import sweep_stale

        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()  # a pid that has exited
        stale, orphans = tmp_path / f"mpi-{gone}-1", tmp_path / f"mpi-{gone}-2"
        ours = tmp_path / f"mpi-{os.getpid()}-1"
        for directory in (stale, orphans, ours):
            directory.mkdir()
        (stale / "env.0.pid").write_text(gone)
        (orphans / "env.1.pid").write_text(str(os.getpid()))  # a rank still alive (here: this process)
        sweep_stale(tmp_path)
        assert not stale.exists() and orphans.exists() and ours.exists()
