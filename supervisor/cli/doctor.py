"""``mlxsupctl doctor``: check this machine before a first run. One PASS/WARN/FAIL line per check, with the fix.

Every check is bounded in time and kills what it starts (children run in their own process group, killed as a
group). MLX is imported only in a child process: the CLI itself never imports it. Exit status 0 when nothing
FAILs, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol.darwin import is_macos
from protocol.footprint import self_footprint
from supervisor import paths
from supervisor.config import Config, ConfigError, load_config
from supervisor.daemon.footprint import GroupSampler, pressure_level, process_footprint, system_memory

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
MiB = 2**20
CHILD_BYTES = 256 * MiB
GRANDCHILD_BYTES = 64 * MiB
CHILD_TIMEOUT = 20.0  # s for a spawned child to report
MLX_TIMEOUT = 90.0  # s for `import mlx.core` in a child (first import compiles nothing, but loads a big library)
GET_PYTHON = "Homebrew `brew install python@3.12`, or uv `uv python install 3.12`"

# Allocates argv[1] bytes after "go" on stdin, touching every page, then idles until killed.
_ALLOCATE = """
import sys, time
print("base", flush=True)
sys.stdin.readline()
size = int(sys.argv[1])
ballast = bytearray(size)
ballast[::4096] = b"\\x01" * len(range(0, size, 4096))
print("ready", flush=True)
time.sleep(600)
"""
# A leader whose child starts an allocating grandchild and exits: the grandchild is re-parented (init/launchd).
_LEADER = """
import subprocess, sys, time
middle = subprocess.Popen([sys.executable, "-c", '''
import subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
grandchild.stdin.write(b"go\\\\n"); grandchild.stdin.flush()
assert grandchild.stdout.readline() == b"base\\\\n" and grandchild.stdout.readline() == b"ready\\\\n"
print(grandchild.pid, flush=True)
''', sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE)
pid = middle.stdout.readline().strip().decode()
middle.wait()
print(pid, flush=True)
time.sleep(600)
"""
_MLX_PROBE = """
import json, mlx.core as mx
metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
print(json.dumps({"version": mx.__version__, "device": str(mx.default_device()), "metal": metal}))
"""


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


class _Failed(Exception):
    """A check's own failure, with its fix."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.fix = fix


@contextmanager
def _child(script: str, *args: object) -> Iterator[subprocess.Popen[bytes]]:
    """``python -c script args`` in its own process group, killed and reaped as a group on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _line(proc: subprocess.Popen[bytes], timeout: float = CHILD_TIMEOUT) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line:
        raise _Failed(f"the test child {proc.pid} said nothing within {timeout:.0f} s",
                      "check that this Python can start subprocesses (sandbox, ulimit -u)")
    return line


def check_python() -> Check:
    from supervisor.daemon.system import exit_probe

    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < (3, 11):  # noqa: UP036 - the doctor may run under whatever Python is at hand
        return Check("python", FAIL, f"Python {version} at {sys.executable}: 3.11 or newer is needed",
                     f"install one ({GET_PYTHON}) and rerun `make venv PYTHON=python3.12`")
    return Check("python", PASS, f"Python {version} at {sys.executable}; child exits seen with "
                 f"{exit_probe().name}")


def check_mlx() -> Check:
    try:
        done = subprocess.run([sys.executable, "-c", _MLX_PROBE], capture_output=True, text=True,
                              timeout=MLX_TIMEOUT, check=False, start_new_session=True)
    except subprocess.TimeoutExpired:
        return Check("mlx", FAIL, f"`import mlx.core` took over {MLX_TIMEOUT:.0f} s", "reinstall mlx in this venv")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        package = "mlx" if is_macos() else "'mlx[cpu]'"
        return Check("mlx", FAIL, f"MLX does not import: {tail}", f"{sys.executable} -m pip install {package}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    detail = f"mlx {info['version']}, default device {info['device']}"
    if info["metal"]:
        return Check("mlx", PASS, detail + " (Metal GPU)")
    if is_macos():
        return Check("mlx", WARN, detail + ": Metal is not available, training runs on the CPU",
                     "use an Apple Silicon Mac with macOS 13.5 or newer and the `mlx` wheel (not mlx[cpu])")
    return Check("mlx", PASS, detail + " (CPU backend: Metal exists only on macOS)")


def check_footprint_self() -> Check:
    ours, outside = self_footprint(), process_footprint(os.getpid())
    what = "physical footprint (libproc)" if is_macos() else "RSS"
    if outside is None or ours <= 0 or abs(ours - outside) > 0.1 * outside:
        return Check("footprint-self", FAIL, f"self {ours} B vs from outside {outside} B ({what})",
                     "report this: the footprint reader disagrees with itself")
    return Check("footprint-self", PASS, f"{ours / MiB:.0f} MiB {what}, same from outside (±10%)")


def check_footprint_child() -> Check:
    with _child(_ALLOCATE, CHILD_BYTES) as proc:
        _line(proc)
        base = process_footprint(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        _line(proc)
        after = process_footprint(proc.pid)
    if base is None or after is None:
        return Check("footprint-child", FAIL, "could not read a child's footprint (denied?)",
                     "run doctor as the user that runs the daemon")
    grown = after - base
    detail = f"a child allocating {CHILD_BYTES // MiB} MiB grew by {grown / MiB:.0f} MiB"
    if abs(grown - CHILD_BYTES) > 0.1 * CHILD_BYTES:
        return Check("footprint-child", FAIL, detail + " (more than 10% off)",
                     "report this with `mlxsupctl doctor --json`")
    return Check("footprint-child", PASS, detail)


def check_group_sampler() -> Check:
    with _child(_LEADER, _ALLOCATE, GRANDCHILD_BYTES) as leader:
        grandchild = int(_line(leader))
        sample = GroupSampler(leader.pid).sample(0.0)
        parent = _ppid(grandchild)
    detail = (f"group of {sample.pids} processes, {sample.bytes / MiB:.0f} MiB, counting a grandchild whose "
              f"parent exited (re-parented to pid {parent})")
    if sample.pids < 2 or sample.bytes < GRANDCHILD_BYTES:
        return Check("group-sampler", FAIL, detail + f": the {GRANDCHILD_BYTES // MiB} MiB grandchild is missing",
                     "report this: a worker's children would escape the budget")
    return Check("group-sampler", PASS, detail)


def _ppid(pid: int) -> int | str:
    import psutil

    try:
        return int(psutil.Process(pid).ppid())
    except psutil.Error:
        return "?"


def check_memory() -> Check:
    available, total = system_memory()
    detail = f"available {available / 2**30:.1f} of {total / 2**30:.1f} GiB"
    if not is_macos():
        return Check("memory", PASS, detail + " (no pressure level on Linux)")
    level = pressure_level()
    names = {1: "normal", 2: "warn", 4: "critical"}
    if level is None:
        return Check("memory", WARN, detail + "; kern.memorystatus_vm_pressure_level unreadable",
                     "the floor then relies on psutil's available (inactive + free), a rough figure")
    status = PASS if level == 1 else WARN
    return Check("memory", status, f"{detail}; pressure {names.get(level, level)} ({level})",
                 "" if level == 1 else "close memory-hungry apps before training")


def check_run_dir(config: Config | None) -> Check:
    run_dir = config.run_dir if config is not None else paths.default_run_dir()
    for name in paths.IPC_SOCKETS:
        if problem := paths.socket_path_problem(run_dir / name):
            return Check("run-dir", FAIL, problem, "set [daemon] run_dir to a shorter path")
    longest = max(len(os.fsencode(run_dir / n)) + 1 for n in paths.IPC_SOCKETS)
    sockets = f"socket paths up to {longest} of {paths.socket_path_limit()} bytes"
    try:
        info = run_dir.lstat()
    except FileNotFoundError:
        parent = next((p for p in run_dir.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK | os.X_OK):
            return Check("run-dir", PASS, f"{run_dir} will be created 0700; {sockets}")
        return Check("run-dir", FAIL, f"{run_dir} cannot be created under {parent}", "set [daemon] run_dir")
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check("run-dir", FAIL, f"{run_dir} is not a private directory of ours (mode {oct(mode)}, "
                     f"uid {info.st_uid})", f"remove it or `chmod 700 {run_dir}`")
    return Check("run-dir", PASS, f"{run_dir} is private ({oct(mode)}); {sockets}")


def check_config(path: Path) -> tuple[Check, Config | None]:
    if not path.exists():
        return Check("config", WARN, f"no config at {path}",
                     f"copy deploy/mlxsup.example.toml to {path} and edit it (or pass -c PATH)"), None
    try:
        config = load_config(path)
    except ConfigError as exc:
        return Check("config", FAIL, str(exc), "fix the key it names"), None
    return Check("config", PASS, f"{path}: {len(config.jobs)} job(s): {', '.join(config.jobs) or 'none'}"), config


def check_service() -> Check:
    from supervisor.install.managers import ManagerError, manager_for
    from supervisor.install.units import current_platform, service_path

    platform = current_platform()
    tool = "launchctl" if platform == "macos" else "systemctl"
    if shutil.which(tool) is None:
        return Check("service", WARN, f"{tool} not found: no service manager here",
                     "run `mlxsupd -c CONFIG` in the foreground (or under your own supervisor)")
    path = service_path(platform, system=False)
    try:
        state = manager_for(platform, False, 0.0, echo=lambda line: None).state()
    except ManagerError as exc:
        why = exc.output.splitlines()[0] if exc.output else str(exc)
        return Check("service", WARN, f"{tool} is present but does not answer for this user: {why}",
                     "on a desktop session it would; here run `mlxsupd -c CONFIG` in the foreground, or "
                     "`loginctl enable-linger $USER` / `mlxsupctl service install --system`")
    if not path.exists():
        return Check("service", WARN, f"{tool} answers; the service is not installed ({path})",
                     "`mlxsupctl service install` to run the daemon as a service (optional)")
    running = f"running, pid {state.pid}" if state.running else f"loaded: {state.loaded}, {state.state}"
    return Check("service", PASS if state.running else WARN, f"{path}: {running}; last exit {state.last_exit}",
                 "" if state.running else "`mlxsupctl service restart`")


def check_daemon(config: Config | None) -> Check:
    from supervisor.control.client import ControlClient
    from supervisor.control.commands import ControlError

    run_dir = config.run_dir if config is not None else paths.default_run_dir()
    endpoint = f"ipc://{run_dir / 'control.sock'}"
    client = ControlClient(endpoint, timeout=1.5)
    try:
        version = client.call("version", {})
    except ControlError as exc:
        return Check("daemon", WARN, f"no daemon answers on {endpoint} ({exc.message})",
                     "start one: `mlxsupd -c CONFIG`, or `mlxsupctl service install`")
    finally:
        client.close()
    return Check("daemon", PASS, f"mlxsupd answers on {endpoint}: {version}")


def run_checks(config_path: Path) -> list[Check]:
    """Every check in order; an unexpected error in one is that check's FAIL, never the end of the report."""
    config_check, config = check_config(config_path)
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("python", check_python), ("mlx", check_mlx), ("footprint-self", check_footprint_self),
        ("footprint-child", check_footprint_child), ("group-sampler", check_group_sampler),
        ("memory", check_memory), ("run-dir", lambda: check_run_dir(config)), ("config", lambda: config_check),
        ("service", check_service), ("daemon", lambda: check_daemon(config)),
    ]
    results = []
    for name, step in steps:
        try:
            results.append(step())
        except _Failed as exc:
            results.append(Check(name, FAIL, str(exc), exc.fix))
        except Exception as exc:  # a doctor reports every failure and goes on
            results.append(Check(name, FAIL, f"{type(exc).__name__}: {exc}", "report this"))
    return results


def doctor(config_path: Path | None, as_json: bool, deep: bool = False, out: Path | None = None) -> int:
    """Print the report; 0 when nothing failed, 1 otherwise. ``deep`` adds the acceptance kit after it
    (supervisor.tools.acceptance), whose JSON goes to ``out`` too."""
    results = run_checks(config_path or paths.default_config_path())
    if deep:
        from supervisor.tools.acceptance import run_and_report

        if not as_json:
            _print(results)
            print()
        failed = any(r.status == FAIL for r in results)
        return max(int(failed), run_and_report(as_json, out))
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        _print(results)
    return 1 if any(r.status == FAIL for r in results) else 0


def _print(results: list[Check]) -> None:
    for r in results:
        print(f"{r.status}  {r.name:<16} {r.detail}")
        if r.fix and r.status != PASS:
            print(f"{'':22}fix: {r.fix}")
