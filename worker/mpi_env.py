"""An MPI rank's environment, published by the daemon's rendezvous (``supervisor.daemon.backends``).

Open MPI joins a process to a world through the PMIx variables ``mpirun`` gives its children. The daemon starts
the ranks itself, so it runs ``mpirun`` over placeholders that write those variables to a file per rank; the rank
loads its file into its own environment before ``MPI_Init`` reads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

_loaded: set[str] = set()  # files already in os.environ
WAIT = 60.0  # seconds for the rendezvous to publish (mpirun starts in well under a second)
PREFIXES = ("OMPI_", "PMIX_", "OPAL_")


class MpiEnvError(RuntimeError):
    """The rank's MPI environment could not be had; the message says where it was looked for."""


def load_mpi_env(path: str, wait: float = WAIT) -> dict[str, str]:
    """Wait (at most ``wait`` seconds) for the ``NAME=value`` lines at ``path`` and put the Open MPI and PMIx
    ones into ``os.environ``; return them."""
    if not path:
        raise MpiEnvError("backend mpi without MLXSUP_MPI_ENV: the daemon's rendezvous names each rank's file")
    file = Path(path)
    deadline = time.monotonic() + wait
    while not file.exists():
        if time.monotonic() > deadline:
            raise MpiEnvError(f"no MPI environment at {file} after {wait:.0f} s: did mpirun start? (see "
                              "mpirun.log in the job's log directory)")
        time.sleep(0.02)
    found = {}
    for line in file.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith(PREFIXES):
            found[key] = value
    if "PMIX_RANK" not in found:
        raise MpiEnvError(f"{file} holds no PMIX_RANK: not an environment written by mpirun")
    os.environ.update(found)
    # The placeholder outlives a lost daemon only while this rank lives: tell it which process that is.
    Path(f"{file}.pid").write_text(str(os.getpid()))
    return found


def join_mpi_world(env: Mapping[str, str]) -> None:
    """For a rank the daemon started with ``MLXSUP_BACKEND=mpi``: load its MPI environment, once per process.

    Runs when the SDK is imported (``worker.gang``), so that a script's own ``mx.distributed.init()``, even one
    called before its ``Session`` exists (as in examples/gang_loop.py), joins the MPI world.
    """
    if env.get("MLXSUP_BACKEND") != "mpi" or not env.get("MLX_RANK"):
        return
    path = env.get("MLXSUP_MPI_ENV", "")
    if path not in _loaded:
        load_mpi_env(path)
        _loaded.add(path)
