"""A gang's MLX backend: ring (the default), MPI or JACCL, checked at config load and turned into each rank's env.

- ring: ``MLX_RANK`` and ``MLX_HOSTFILE`` (``supervisor.hostfile``).
- mpi (Open MPI, one host): MLX dlopens ``libmpi.so`` (or ``MLX_MPI_LIBNAME``) and calls ``MPI_Init``; a process
  not started by ``mpirun`` gets a world of one (Open MPI's singleton init) and MLX refuses it. The ranks still
  are the daemon's own children: for each generation the daemon runs ``mpirun`` over placeholders
  (``supervisor.daemon.mpi``) whose only job is to publish the PMIx environment of each MPI rank; rank R reads
  ``MLXSUP_MPI_ENV`` (its placeholder's environment) before ``MPI_Init`` and joins that world.
- jaccl (RDMA over Thunderbolt, macOS 26.2 and later): ``MLX_RANK``, ``MLX_JACCL_COORDINATOR`` (rank 0's
  ip:port), ``MLX_IBV_DEVICES`` (a file holding the N x N matrix of ibverbs device names, null on the diagonal)
  and ``MLX_JACCL_RING=1`` for the ring variant. They come from the hostfile ``mlx.distributed_config --backend
  jaccl`` writes (its ``rdma`` entries, ``backend`` and ``envs``) or from the job's ``env``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from protocol.durable import write_durably
from supervisor.hostfile import Layout

BACKENDS = ("ring", "mpi", "jaccl")
MPI_INSTALL = "Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev; macOS: brew install open-mpi"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BackendError(ValueError):
    """A backend setting that cannot be used; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """What a gang's ranks need for their backend, beyond the ring variables every gang gets."""

    name: str = "ring"
    env: tuple[tuple[str, str], ...] = ()  # the hostfile's "envs", for every rank
    coordinator: str = ""  # jaccl: MLX_JACCL_COORDINATOR as configured ("" -> rank 0's address, generation port)
    devices: tuple[tuple[Any, ...], ...] = ()  # jaccl: the MLX_IBV_DEVICES matrix
    jaccl_ring: bool = False


def resolve_backend(name: str, layout: Layout, hostfile_path: str, env: Mapping[str, str]) -> Backend:
    """The backend of a gang from its config (``hostfile_path`` and a path in ``env``, the job's env table, are
    absolute by then); BackendError names what is wrong."""
    hostfile = Path(hostfile_path) if hostfile_path else None
    if name not in BACKENDS:
        raise BackendError(f"backend = {name!r}: expected one of {', '.join(BACKENDS)}")
    raw = _hostfile_json(hostfile)
    declared = str(raw.get("backend", "") or "")
    if declared and declared.removesuffix("-ring") != name:
        raise BackendError(f"the hostfile {hostfile} is written for backend {declared!r}, the job says "
                           f"backend = {name!r}")
    extra = _envs(raw.get("envs", []), hostfile)
    if name == "ring":
        return Backend(env=extra)
    if name == "mpi":
        if len(layout.hosts) > 1:
            raise BackendError("backend = \"mpi\" runs the ranks of one host (mpirun would start the others over "
                               "ssh, out of their daemon's sight); over several hosts use ring or jaccl")
        if shutil.which("mpirun") is None:
            raise BackendError(f"backend = \"mpi\" needs Open MPI's mpirun on PATH ({MPI_INSTALL})")
        return Backend("mpi", extra)
    return _jaccl(layout, raw, hostfile, env, extra, declared == "jaccl-ring")


def _hostfile_json(hostfile: Path | None) -> dict[str, Any]:
    if hostfile is None:
        return {}
    try:
        data = json.loads(hostfile.read_text())  # read_hostfile has checked it is readable JSON
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {"hosts": data}


def _envs(envs: Any, hostfile: Path | None) -> tuple[tuple[str, str], ...]:
    if not isinstance(envs, list) or not all(isinstance(e, str) for e in envs):
        raise BackendError(f"hostfile {hostfile}: \"envs\" must be a list of \"NAME=value\" strings")
    pairs = []
    for entry in envs:
        key, sep, value = entry.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise BackendError(f"hostfile {hostfile}: envs entry {entry!r} is not NAME=value")
        pairs.append((key, value))
    return tuple(pairs)


def _jaccl(layout: Layout, raw: dict[str, Any], hostfile: Path | None, env: Mapping[str, str],
           extra: tuple[tuple[str, str], ...], hostfile_ring: bool) -> Backend:
    coordinator = env.get("MLX_JACCL_COORDINATOR", "")
    if coordinator:
        check_coordinator(coordinator)
    ring_flag = env.get("MLX_JACCL_RING", "")
    if ring_flag not in ("", "0", "1"):
        raise BackendError(f"env MLX_JACCL_RING = {ring_flag!r}: expected \"0\" or \"1\"")
    if env.get("MLX_IBV_DEVICES"):
        path = Path(env["MLX_IBV_DEVICES"])
        try:
            matrix = json.loads(path.read_text())
        except OSError as exc:
            raise BackendError(f"env MLX_IBV_DEVICES: {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise BackendError(f"env MLX_IBV_DEVICES: {path}: not JSON ({exc})") from None
        where = f"env MLX_IBV_DEVICES ({path})"
    else:
        hosts = raw.get("hosts", [])
        matrix = [h.get("rdma") for h in hosts if isinstance(h, dict)] if isinstance(hosts, list) else []
        if not matrix or any(row is None for row in matrix):
            raise BackendError("backend = \"jaccl\" needs the RDMA devices between the ranks: a hostfile written by "
                               "`mlx.distributed_config --backend jaccl` (with \"rdma\" in every entry), or env "
                               "MLX_IBV_DEVICES = a device file")
        where = f"hostfile {hostfile} (\"rdma\")"
    ring = ring_flag == "1" or (hostfile_ring and ring_flag != "0")
    devices = check_devices(matrix, layout.world, ring, where)
    return Backend("jaccl", extra, coordinator, devices, ring)


def check_coordinator(value: str) -> None:
    """BackendError unless ``value`` is ``ip:port`` (``[v6]:port`` for IPv6)."""
    host, sep, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = bool(sep) and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise BackendError(f"env MLX_JACCL_COORDINATOR = {value!r}: expected rank 0's IP address and a port, "
                           "e.g. 10.0.0.1:32323")


def check_devices(matrix: Any, world: int, ring: bool, where: str) -> tuple[tuple[Any, ...], ...]:
    """The device matrix as MLX's JACCL reads it, checked: ``world`` rows of ``world`` entries, null on the
    diagonal, each other entry a device name or a list of them; a mesh connects every pair, a ring (JACCL's
    ring variant) at least each rank's two neighbours."""
    if not isinstance(matrix, list) or len(matrix) != world:
        size = len(matrix) if isinstance(matrix, list) else type(matrix).__name__
        raise BackendError(f"{where}: the RDMA device matrix needs {world} rows, one per rank (got {size})")
    rows = []
    for rank, row in enumerate(matrix):
        if not isinstance(row, list) or len(row) != world:
            raise BackendError(f"{where}: rank {rank}'s devices need {world} entries, one per rank")
        for peer, names in enumerate(row):
            named = (isinstance(names, str) and bool(names)) or (
                isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names))
            if peer == rank and names is not None:
                raise BackendError(f"{where}: rank {rank}'s entry for itself must be null, got {names!r}")
            if peer != rank and names is not None and not named:
                raise BackendError(f"{where}: rank {rank} -> {peer}: {names!r} is not a device name or a list "
                                   "of names")
            neighbour = (peer - rank) % world in (1, world - 1)
            if peer != rank and names is None and (not ring or neighbour):
                kind = "its ring neighbour" if ring else "every other rank (JACCL's mesh is fully connected)"
                raise BackendError(f"{where}: rank {rank} has no device to rank {peer}: it needs one to {kind}")
        rows.append(tuple(row))
    return tuple(rows)


def rank_env(backend: Backend, layout: Layout, generation: int, files: Path) -> dict[str, str]:
    """What every rank of a generation gets for its backend (``files``: where the daemon keeps the gang's files;
    for MPI, ``MLXSUP_MPI_ENV`` is completed per rank by the caller)."""
    env = {"MLXSUP_BACKEND": backend.name, **dict(backend.env)}
    if backend.name == "jaccl":
        env["MLX_JACCL_COORDINATOR"] = backend.coordinator or layout.ring(generation)[0][0]
        env["MLX_IBV_DEVICES"] = str(files / "ibv_devices.json")
        if backend.jaccl_ring:
            env["MLX_JACCL_RING"] = "1"
    return env


def write_files(backend: Backend, files: Path) -> None:
    """The files a generation's ranks read at init (JACCL's device matrix), written durably."""
    if backend.name == "jaccl":
        files.mkdir(parents=True, exist_ok=True)
        write_durably(files / "ibv_devices.json", json.dumps([list(row) for row in backend.devices]))
