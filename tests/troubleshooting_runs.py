"""The runs behind tests/test_troubleshooting.py: each scenario causes, for real, a few of the messages
docs/troubleshooting.md quotes (the CLIs' real ``main`` with bad input, a real daemon service, the SDK's checkpoint
code, the pure policy, one ``mlxsupd run`` to its end), and returns what the user would see."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import msgpack


@contextlib.contextmanager
def inside(directory: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def call(main: Callable[[list[str]], int], argv: list[str], where: Path) -> str:
    """Run a CLI's real ``main`` in this process; what it wrote to stdout and stderr, with its exit status."""
    out = io.StringIO()
    with inside(where), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = int(exc.code or 0)
    return f"{out.getvalue()}\n[exit {code}]"


def mlxsupd(where: Path, *argv: str) -> str:
    from supervisor.cli.mlxsupd import main

    return call(main, list(argv), where)


def config(where: Path, text: str, name: str = "t.toml") -> str:
    """A config file in ``where`` whose daemon keeps its files there (never the shared default run dir)."""
    head = f'[daemon]\nstate_dir = "{where}/state"\nrun_dir = "{where}/run"\n'
    path = where / name
    path.write_text(text if text.startswith("[daemon]") else head + text)
    return str(path)


JOB = '[jobs.train]\nbudget = "4GiB"\n'
GANG = '[jobs.a]\nbudget = "4GiB"\ncommand = ["python", "t.py"]\n'


def starting(where: Path) -> str:
    (where / "train.sh").write_text("echo hi\n")
    (where / "train.sh").chmod(0o644)
    (where / "ok.py").write_text("print('hi')\n")
    runs = [["run", "--budget", "4GiB", "python", "train.py"], ["run", "--budget", "4GiB", "--", "python", "train.py"],
            ["run", "--budget", "4GiB", "--", "trian"], ["run", "--budget", "4GiB", "--", "./train.sh"],
            ["run", "--budget", "100TiB", "--", "python", "ok.py"], ["run", "--budget", "4Gi", "--", "python", "ok.py"],
            ["run", "--budget", "4GiB", "--kill", "3GiB", "--", "python", "ok.py"]]
    # A run that got past its checks would keep its files here, never in the user's state dir.
    return "\n".join(mlxsupd(where, argv[0], "--state-dir", str(where / "state"), *argv[1:]) for argv in runs)


def another_daemon(where: Path) -> str:
    path = config(where, "")
    run = where / "run"
    run.mkdir(mode=0o700)
    with open(run / "mlxsupd.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return mlxsupd(where, "-c", path)


def config_errors(where: Path) -> str:
    (where / "h.json").write_text('{"x": 1}')
    long_dir = where / ("d" * 120)
    bodies = ["x = [\n", JOB + "btach = 4\n", "[daemon]\nbudget = 1\n", JOB + "batch = 0\n",
              JOB + "batch = 4\nmin_batch = 8\n", JOB + "sdk = false\n",
              JOB + 'restart = "never"\nsdk = true\ncommand = ["python", "t.py"]\n',
              f'[daemon]\nstate_dir = "{where}/state"\nrun_dir = "{long_dir}"\n',
              '[daemon.control]\ntcp = "tcp://127.0.0.1:5999"\n',
              GANG + "sdk = false\nranks = 2\n", '[jobs.a]\nbudget = "4GiB"\ncommand = ["mlx.launch", "t.py"]\n',
              GANG + 'hosts = ["10.0.0.1", "10.0.0.2"]\n', GANG + 'hostfile = "h.json"\n', GANG + "ranks = 200\n"]
    said = [mlxsupd(where, "-c", "nothere.toml")]
    for number, body in enumerate(bodies):
        said.append(mlxsupd(where, "-c", config(where, body, f"c{number}.toml")))
    return "\n".join(said)


def no_reply(where: Path) -> str:
    from supervisor.cli.mlxsupctl import main

    return call(main, ["-c", config(where, ""), "--timeout", "0.3", "status"], where)


def doctor_config(where: Path) -> str:
    from supervisor.cli.doctor import _print, check_config

    check, _ = check_config(Path(config(where, JOB + "btach = 4\n")))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _print([check])
    return out.getvalue()


def checkpoints(where: Path) -> str:
    """Damage checkpoints as a disk or a careless copy would, and load them as the SDK does at its start."""
    import mlx.core as mx

    from worker.checkpoint import load_latest, save_checkpoint
    from worker.session import Session

    worker = SimpleNamespace(settings=SimpleNamespace(job="train"))
    damage: list[Callable[[Path], object]] = [
        lambda p: (p / "model.safetensors").write_bytes(_flip((p / "model.safetensors").read_bytes())),
        lambda p: (p / "meta.json").write_text("{"),
        lambda p: (p / "meta.json").write_text(json.dumps({**json.loads((p / "meta.json").read_text()), "step": 11})),
    ]
    err = io.StringIO()
    for number, harm in enumerate(damage):
        path = save_checkpoint(where / f"c{number}", 10, {"w": mx.ones((64,))}, {"m": mx.zeros((64,))}, {})
        harm(path)
        with contextlib.redirect_stderr(err):
            assert load_latest(path.parent, log=lambda event, fields: Session._log(worker, event, fields)) is None  # type: ignore[arg-type]
    return err.getvalue()


def other_checkpoints(where: Path) -> str:
    """A checkpoint that lists another SDK's files, and one that cannot be written (its directory is a file)."""
    import mlx.core as mx

    from worker.checkpoint import CheckpointError, load_latest, save_checkpoint
    from worker.session import Session

    worker = SimpleNamespace(settings=SimpleNamespace(job="train"))
    path = save_checkpoint(where / "rust", 10, {"w": mx.ones((64,))}, {"m": mx.zeros((64,))}, {})
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {"weights.safetensors": meta["files"]["model.safetensors"]}
    (path / "meta.json").write_text(json.dumps(meta))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert load_latest(path.parent, log=lambda event, fields: Session._log(worker, event, fields)) is None  # type: ignore[arg-type]
    (where / "full").write_text("a file where the directory should be")
    try:
        save_checkpoint(where / "full" / "ckpts", 10, {"w": mx.ones((4,))}, {"m": mx.zeros((4,))}, {})
    except CheckpointError as exc:
        err.write(f"{exc}\n")
    return err.getvalue()


def refusals(where: Path) -> str:
    """A real daemon service (sockets bound, its loop not running) refusing a command for the key's role, and
    a job it does not have; and an allow-list holding a secret key."""
    from protocol.control import ControlError
    from supervisor.config import ConfigError, load_config
    from supervisor.control.access import LOCAL, Principal, Role, read_authorized_keys
    from supervisor.daemon.server import DaemonService

    said = []
    service = DaemonService(load_config(config(where, JOB + "autostart = false\n")))
    try:
        for command, principal in (("stop", Principal("grafana", Role.READ)), ("start", LOCAL)):
            try:
                service.control.dispatch(command, {"job": "nojob"}, principal)
            except ControlError as exc:
                said.append(exc.message)
    finally:
        service.close()
    (where / "authorized_keys").write_text('secret-key = "' + "x" * 40 + '"\n')
    try:
        read_authorized_keys(where / "authorized_keys")
    except ConfigError as exc:
        said.append(str(exc))
    return "\n".join(said)


def _flip(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[-3] ^= 0xFF
    return bytes(changed)


def protocol_errors(where: Path) -> str:
    from protocol.messages import ProtocolError, decode, negotiate
    from worker.session import SessionSettings

    said = []
    attempts: list[Callable[[], object]] = [
        lambda: decode(b"\xc1"), lambda: decode(msgpack.packb([1])),
        lambda: decode(msgpack.packb({"v": 1, "t": "nope"})), lambda: negotiate(0),
        lambda: SessionSettings.from_env({"MLXSUP_BATCH": "x"})]
    for attempt in attempts:
        try:
            attempt()
        except (ProtocolError, ValueError) as exc:
            said.append(str(exc))
    return "\n".join(said)


def decisions(where: Path) -> str:
    """The pure policy's reasons: a breach at a steady footprint (a peak) and with a steady leak, and a leak
    about to reach the budget."""
    from supervisor.core.policy import Estimator, Limits, MiB, PolicyConfig, diagnose_breach, on_step

    settings = PolicyConfig()
    peak, leak = Estimator(settings), Estimator(settings)
    for step in range(1, 40):
        peak.observe_step(step, 1000 * MiB, reported_transient=300 * MiB)
        leak.observe_step(step, 1000 * MiB + step * 2 * MiB)
    said = [diagnose_breach(estimator, 8, 1, settings).reason for estimator in (peak, leak)]
    near = Limits(warn=1000 * MiB, budget=1082 * MiB, kill=1200 * MiB)  # the leak reaches it in 2 steps
    return "\n".join([*said, on_step(leak, near, 8, 1, 0, settings).reason])


GUARD = {"sdk": False, "command": ["python", "t.py"], "autostart": False}


def lifecycle_fake(where: Path) -> str:
    """The daemon's own reasons, from its real lifecycle and daemon service over a fake OS (a fake clock, fake
    processes, fake memory), so timeouts and attempts take no time: what ``mlxsupctl history`` and the log show."""
    from tests.test_lifecycle import Service

    mib = 2**20
    (where / "floor").mkdir()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        jobs = Service(where, where / "run", {
            "boot": {"startup_timeout": 1.0, "max_attempts_without_progress": 2, "autostart": False},
            "hang": {"hang_timeout": 1.0, "autostart": False},
            "crash": {"max_attempts_without_progress": 2, "backoff_initial": 0.1, "autostart": False},
            "usage": {"autostart": False}, "slow": {"checkpoint_timeout": 1.0, "autostart": False},
            "ceiling": {"autostart": False}, "guard": {**GUARD, "max_attempts_without_progress": 2},
            "never": {**GUARD, "restart": "never"}})
        floor = Service(where / "floor", where / "floor" / "run", {"sdk": {"autostart": False}, "guarded": GUARD},
                        system_floor="4GiB")
        try:
            for service in (jobs, floor):
                for name in service.daemon.jobs:
                    service.job(name).start(service.system.clock)
            for name in ("hang", "crash", "slow", "ceiling"):
                jobs.hello(name)
            floor.hello("sdk")
            jobs.proc("usage").code = 2  # an argparse error before its hello
            jobs.call("stop", job="slow")  # it never checkpoints
            floor.system.available = 1 << 30
            for _ in range(80):  # 16 s of the fake clock
                for name, sampled in (("guard", 1050 * mib), ("never", 1050 * mib), ("ceiling", 1200 * mib)):
                    if jobs.job(name).life is not None and jobs.proc(name).code is None:
                        jobs.proc(name).sampled = sampled
                if jobs.job("crash").life is not None:
                    jobs.proc("crash").code = 1
                jobs.turn(0.2)
                floor.turn(0.2)
            reasons = [str(e["reason"]) for service in (jobs, floor) for job in service.daemon.jobs.values()
                       for e in job.history.events if e.get("reason")]
        finally:
            jobs.close()
            floor.close()
    return "\n".join(reasons) + "\n" + out.getvalue()


def gang_hangs(where: Path) -> str:
    """A gang's hang reason, named by its shape: a rank silent while its peer waits in a collective, then every
    rank waiting inside one."""
    from supervisor.core.hangs import gang_hang
    from supervisor.core.life import Life, Rank
    from supervisor.core.policy import Estimator, PolicyConfig

    now = 100.0

    def rank(number: int, heard: float, waiting: str = "") -> Rank:
        return Rank(number, Estimator(PolicyConfig()), now - heard, waiting=waiting,
                    waiting_since=now - 2.4 if waiting else float("inf"))

    silent = Life(1, 0.0, 8, 1, {0: rank(0, 0.5, "all_sum"), 1: rank(1, 3.1)})
    blocked = Life(1, 0.0, 8, 1, {0: rank(0, 2.5, "all_sum"), 1: rank(1, 2.5, "all_sum")})
    return "\n".join(gang_hang(life, now, 60.0) for life in (silent, blocked))


def fatal_report(where: Path) -> str:
    """``mlxsupd run`` of a command that refuses its arguments, to its end: the report, then the history."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "supervisor.cli.mlxsupd", "run", "--state-dir", str(where / "st"), "--name", "train",
         "--budget", "1GiB", "--", sys.executable, "-c", "raise ValueError('bad lr')"],
        capture_output=True, text=True, timeout=60, env=env, cwd=where)
    history = where / "st" / "jobs" / "train" / "history.jsonl"
    reasons = [json.loads(line).get("reason", "") for line in history.read_text().splitlines()]
    return done.stderr + "\n" + "\n".join(reasons)


SCENARIOS: dict[str, Callable[[Path], str]] = {
    "starting": starting, "another_daemon": another_daemon, "config": config_errors, "no_reply": no_reply,
    "doctor": doctor_config, "checkpoints": checkpoints, "protocol": protocol_errors, "report": fatal_report,
    "other_checkpoints": other_checkpoints, "refusals": refusals, "decisions": decisions,
    "lifecycle_fake": lifecycle_fake, "gang_hangs": gang_hangs}

# Quote on the page -> the scenario that produces it.
