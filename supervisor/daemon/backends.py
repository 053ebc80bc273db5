"""What a gang's backend needs around its ranks in each generation: JACCL's device file, MPI's rendezvous.

Open MPI forms a world only through a PMIx server: a process that is not started by ``mpirun`` initialises as a
singleton (a world of one, which MLX refuses: "[mpi] The world has a single process"). Yet the PMIx server does not
care which process connects as a rank, only that the uid matches. So for each generation the daemon runs ``mpirun
-np N`` over placeholders (a few lines of sh each): placeholder R writes its ``OMPI_*``/``PMIX_*`` environment to
``env.R`` and waits. The daemon starts rank R itself, as for ring, in its own process group, sampled and budgeted;
the SDK loads ``env.R`` (``MLXSUP_MPI_ENV``) before ``MPI_Init`` and joins the world as MPI rank R. The rendezvous
must outlive every rank of its generation (a rank whose ``mpirun`` is killed, by SIGTERM or SIGKILL, aborts with
code 195), so it ends only once they are all reaped: a ``stop`` file ends the placeholders, after which ``mpirun``
exits by itself, and its group gets SIGKILL if it has not within ``STOP_GRACE``. With the daemon gone, each
placeholder leaves once its rank has (ranks write their pid beside their environment). The rendezvous is the
daemon's helper, not a rank: it is neither sampled nor budgeted (about 20 MiB for ``mpirun``, 2 MiB per
placeholder).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.backends import Backend, resolve_backend, write_files
from supervisor.backends import rank_env as backend_env

if TYPE_CHECKING:
    from supervisor.daemon.job import Job

STOP_GRACE = 5.0  # seconds from the stop file to SIGKILL of mpirun's group
# Placeholder rank: publish this MPI rank's environment for the daemon's rank, then wait for the stop file; with
# the daemon gone, for as long as its rank lives (an orphaned rank checkpoints by itself, over MPI, and a rank whose
# mpirun is killed aborts). $1: the generation's directory, $2: the daemon's pid; the rank writes env.R.pid.
PLACEHOLDER = r"""
r=$OMPI_COMM_WORLD_RANK
env | grep -E '^(OMPI_|PMIX_|OPAL_)' > "$1/env.$r.tmp" && mv "$1/env.$r.tmp" "$1/env.$r"
while [ ! -e "$1/stop" ]; do
  if ! kill -0 "$2" 2>/dev/null; then
    p=$(cat "$1/env.$r.pid" 2>/dev/null)
    { [ -n "$p" ] && kill -0 "$p" 2>/dev/null; } || break
  fi
  sleep 0.2
done
"""


class Rendezvous:
    """One generation's ``mpirun`` over placeholders, in a session of its own."""

    def __init__(self, directory: Path, world: int, log: Path) -> None:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise FileNotFoundError("mpirun is not on PATH (backend = \"mpi\" needs Open MPI)")
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        self.directory = directory
        # Loopback only: the ranks are on this host, and nothing of the gang listens beyond it.
        argv = [mpirun, "-np", str(world), "--oversubscribe", "--mca", "oob_tcp_if_include", "127.0.0.0/8",
                "--mca", "btl_tcp_if_include", "127.0.0.0/8", "/bin/sh", "-c", PLACEHOLDER,
                "mlxsup-mpi-placeholder", str(directory), str(os.getpid())]
        env = dict(os.environ)
        if os.geteuid() == 0:  # Open MPI refuses root unless told twice
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:  # this generation's output only: bounded, and the one that matters
            self._popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                           start_new_session=True, close_fds=True)
        self.pid = self._popen.pid
        self.stopping_since: float | None = None

    def env_file(self, rank: int) -> Path:
        return self.directory / f"env.{rank}"

    def stop(self, now: float) -> None:
        """End the placeholders (mpirun follows them); SIGKILL its group if it is still there after STOP_GRACE."""
        if self.stopping_since is None:
            self.stopping_since = now
            try:
                (self.directory / "stop").touch()
            except OSError:
                self.kill()
        elif now - self.stopping_since > STOP_GRACE:
            self.kill()

    def kill(self) -> None:
        if self._popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def poll(self) -> int | None:
        return self._popen.poll()


def backend_of(job: Job) -> Backend:
    """The job's backend, resolved from its config (again after a reload changed the config)."""
    cached = job.backend
    if cached is not None and cached[0] is job.config:
        return cached[1]
    backend = Backend()
    if job.layout is not None:
        backend = resolve_backend(job.config.backend, job.layout, job.config.hostfile, job.config.env)
    job.backend = (job.config, backend)
    return backend


def files_dir(job: Job) -> Path:
    ring = job.paths.ring
    assert ring is not None  # a gang always has its ring file
    return ring.with_name(f"{ring.stem}.files")


def prepare(job: Job, life: int) -> dict[int, dict[str, str]]:
    """Before a generation's ranks are spawned: write its backend's files, start its rendezvous; the extra
    environment of each local rank. OSError (also for a backend the config no longer allows) fails the spawn."""
    if job.layout is None or job.paths.ring is None:
        return {}
    try:
        backend = backend_of(job)
    except ValueError as exc:
        raise OSError(str(exc)) from None
    files = files_dir(job)
    write_files(backend, files)
    common = backend_env(backend, job.layout, life, files)
    envs = {rank: dict(common) for rank in job.lifecycle.settings.ranks}
    if backend.name == "mpi":
        sweep_stale(files)
        # Named by this daemon's pid too: a restarted daemon never touches the rendezvous its predecessor's
        # orphaned ranks may still be checkpointing through.
        rendezvous = Rendezvous(files / f"mpi-{os.getpid()}-{life}", job.layout.world, job.paths.logs / "mpirun.log")
        job.rendezvous[life] = rendezvous
        for rank, env in envs.items():
            env["MLXSUP_MPI_ENV"] = str(rendezvous.env_file(rank))
    return envs


def sweep_stale(files: Path) -> None:
    """Remove the rendezvous directories of daemons that are gone, once none of their ranks lives either (a
    placeholder waits for its rank by the pid file in that directory)."""
    for directory in files.glob("mpi-*-*"):
        pids = [directory.name.split("-")[1]]
        for pid_file in directory.glob("env.*.pid"):
            try:
                pids.append(pid_file.read_text().strip())
            except OSError:
                continue
        if not any(_alive(pid) for pid in pids):
            shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def rank_environment(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """A rank's environment: the job's, with its backend's on top. Only the ring backend gets ``MLX_HOSTFILE``:
    with it, a script's ``mx.distributed.init()`` (backend "any", which tries ring first) would join a ring."""
    env = {**base, **extra}
    if env.get("MLXSUP_BACKEND", "ring") != "ring":
        env.pop("MLX_HOSTFILE", None)
    return env


def tidy(job: Job, now: float) -> None:
    """Each tick: stop the rendezvous of every generation none of whose ranks is left, and reap it."""
    for life, rendezvous in list(job.rendezvous.items()):
        if any(key[0] == life for key in job.procs):
            continue
        rendezvous.stop(now)
        if rendezvous.poll() is not None:
            del job.rendezvous[life]
            shutil.rmtree(rendezvous.directory, ignore_errors=True)
