"""Security checks against a running daemon: CURVE, run-dir and socket permissions, spawn tokens, wire paths.

One service-mode daemon with a running job and a CURVE TCP endpoint on loopback serves every check; the
second-daemon check comes last because a second daemon that is (wrongly) let in takes the sockets over.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from protocol import CheckpointSaved, Goodbye, Hello, Step, encode
from supervisor.daemon.rundir import RunDirError, prepare_run_dir
from tests.faults.common import (
    SMALL,
    Area,
    FaultResult,
    Group,
    Workspace,
    mlxsupd,
    start_daemon,
    sweep_orphans,
    wait_until,
    worker_of,
)
from tests.faults.wire import Control, WorkerPeer, answers

# (command, args, expected error code): names and paths from the wire never escape their directories.
ESCAPES: list[tuple[str, dict[str, Any], str]] = [
    ("tail", {"job": "j", "stream": "../../etc/passwd"}, "bad_value"),
    ("tail", {"job": "j", "stream": "/etc/passwd"}, "bad_value"),
    ("tail", {"job": "../j", "stream": "stdout"}, "no_such_job"),
    ("start", {"job": "../x"}, "no_such_job"),
    ("start", {"job": "/etc/passwd"}, "no_such_job"),
    ("start", {"job": "evil"}, "no_such_job"),
    ("history", {"job": "../../x"}, "no_such_job"),
    ("status", {"job": "j/../j"}, "no_such_job"),
    ("signal", {"job": "j", "signal": "../9"}, "bad_value"),
    ("budget", {"job": "j", "value": "../../1GiB"}, "bad_value"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_keys(directory: Path, extra: tuple[str, ...] = ()) -> dict[str, tuple[bytes, bytes]]:
    """CURVE keypairs (public, secret) for the server, an authorized client, an intruder and ``extra`` ones."""
    directory.mkdir(mode=0o700)
    keys = {}
    for name in ("server", "alice", "mallory", *extra):
        zmq.auth.create_certificates(str(directory), name)
        public, secret = zmq.auth.load_certificate(str(directory / f"{name}.key_secret"))
        assert secret is not None
        keys[name] = (public, secret)
    return keys


def tcp_reply(endpoint: str, client: tuple[bytes, bytes] | None, server: bytes) -> bool:
    """Whether a `version` request over TCP gets an answer (with CURVE when ``client`` is given)."""
    curve = (client[0], client[1], server) if client is not None else None
    control = Control(endpoint, curve)
    try:
        reply = control.request("version", timeout=2.0)
        return reply is not None and bool(reply.get("ok"))
    finally:
        control.close()


def curve(area: Area, client: Control, endpoint: str, keys: dict[str, tuple[bytes, bytes]]) -> FaultResult:
    """No key, a wrong key, the wrong server key and a revoked key are refused; the right key works."""
    result = FaultResult("CURVE: no/wrong/revoked key")
    server = keys["server"][0]
    accepted = tcp_reply(endpoint, keys["alice"], server)
    cases = {"no key (plain TCP)": tcp_reply(endpoint, None, server),
             "unauthorized key": tcp_reply(endpoint, keys["mallory"], server),
             "wrong server key": tcp_reply(endpoint, keys["alice"], keys["mallory"][0])}
    session = Control(endpoint, (keys["alice"][0], keys["alice"][1], server))  # connected before the revocation
    try:
        session_ok = (session.request("version", timeout=2.0) or {}).get("ok") is True
        (area.root / "authorized").write_text("# nobody\n")
        client.result("reread")
        client.result("update")
        cases["revoked key (reread + update)"] = tcp_reply(endpoint, keys["alice"], server)
        cases["revoked key, session opened before"] = (session.request("version", timeout=2.0) or {}).get("ok") is True
    finally:
        session.close()
    if not session_ok:
        result.note("the long-lived session did not answer before the revocation either")
    if cases["revoked key, session opened before"]:
        result.note("BUG: ZAP authenticates at the handshake only, so an open session of a revoked key keeps working")
    result.count = len(cases)
    result.survived = sum(not answered for answered in cases.values()) if accepted and session_ok else 0
    refused_log = (area.root / "daemon.log").read_text(errors="replace").count('"control_refused"')
    result.note(f"authorized key answered before revocation: {accepted}; "
                + ", ".join(f"{k}: {'ANSWERED' if v else 'refused'}" for k, v in cases.items())
                + f"; control_refused logged {refused_log}x")
    return result


def refused(path: Path) -> bool:
    """Whether prepare_run_dir refuses ``path``."""
    try:
        prepare_run_dir(path)
    except RunDirError:
        return True
    return False


def run_dir_checks(area: Area, ws: Workspace) -> FaultResult:
    """Unsafe run dirs are refused by prepare_run_dir and by mlxsupd (exit 2); a live one is 0700/0600."""
    result = FaultResult("run dir / socket permissions")
    outcomes: dict[str, bool] = {}
    for name, mode, uid in (("0777", 0o777, None), ("0770", 0o770, None), ("other uid", 0o700, 65534)):
        path = area.root / f"unsafe-{name.replace(' ', '-')}"
        path.mkdir()
        os.chmod(path, mode)
        if uid is not None:
            try:
                os.chown(path, uid, -1)
            except PermissionError:
                result.note("not root: foreign-owner case skipped")
                continue
        outcomes[f"prepare_run_dir {name}"] = refused(path)
    # A planted symlink (e.g. /tmp/mlxsup-UID -> a directory of ours that others can read) must not be followed:
    # the daemon would chmod and fill a directory chosen by someone else.
    target = area.root / "symlink-target"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    (area.root / "symlink").symlink_to(target)
    outcomes["prepare_run_dir symlink"] = refused(area.root / "symlink")
    if not outcomes["prepare_run_dir symlink"]:
        mode = oct(stat.S_IMODE(target.stat().st_mode))
        result.note(f"BUG: a symlinked run dir is followed (its 0o755 target was chmod'ed to {mode})")
    unsafe = area.root / "unsafe-0777"
    (area.root / "unsafe-config").mkdir()
    config = Area(area.root / "unsafe-config").config({"j": {"autostart": False}}, run_dir=str(unsafe))
    commands = {"mlxsupd": mlxsupd("-c", str(config)), "mlxsupd run": mlxsupd("run", "-c", str(config), "j")}
    for label, argv in commands.items():
        proc = Group(argv, area.root / f"{label.replace(' ', '-')}.log", ws.mark)
        code = proc.wait(30)
        proc.kill()
        text = (area.root / f"{label.replace(' ', '-')}.log").read_text(errors="replace")
        outcomes[f"{label} exit 2"] = code == 2 and "writable" in text
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [area.run_dir, *area.run_dir.glob("*.sock")]}
    outcomes["live run dir 0700, sockets 0600"] = modes.pop("run") == 0o700 and set(modes.values()) == {0o600}
    result.count = len(outcomes)
    result.survived = sum(outcomes.values())
    result.note(", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in outcomes.items()))
    return result


def spawn_token(area: Area, client: Control) -> FaultResult:
    """A peer with a wrong token says hello then reports absurd steps: ignored, logged, job unaffected."""
    result = FaultResult("worker hello with a bad token")
    before = client.job("j")
    peer = WorkerPeer(area.run_dir)
    try:
        peer.send([encode(Hello("f" * 32, int(before["pid"]), "j", 10**9, 10**9, 1, 1))])
        for step in range(50):
            peer.send([encode(Step(10**9 + step, 1, 1, 0.0, 0.01, 10**13, 0, 10**13, 10**13))])
        peer.send([encode(CheckpointSaved(10**9, "/etc/passwd", 0.1, 1))])
        peer.send([encode(Goodbye("finished", 10**9))])
        time.sleep(1.5)
        replies = peer.drain()
    finally:
        peer.close()
    after = client.job("j")
    text = (area.root / "daemon.log").read_text(errors="replace")
    decisions = [e for e in area.history("j") if e.get("event") in ("decision", "kill")]
    unaffected = (after["state"] == "RUNNING" and after["pid"] == before["pid"] and after["step"] < 10**8
                  and after["max_sampled_bytes"] < 10**12 and after["target_steps"] == before["target_steps"]
                  and not decisions)
    rejected, ignored = text.count('"worker_hello_rejected"'), text.count('"worker_message_ignored"')
    result.count = 1
    result.survived = int(unaffected and rejected >= 1 and ignored >= 52 and replies == 0)
    result.note(f"job {after['state']} pid {after['pid']} step {before['step']}->{after['step']} target "
                f"{after['target_steps']}; decisions/kills {len(decisions)}; replies to the peer {replies}; log: "
                f"worker_hello_rejected {rejected}, worker_message_ignored {ignored}")
    return result


def wire_paths(area: Area, client: Control) -> FaultResult:
    """Names and paths from the wire cannot escape; only configured jobs can be started."""
    result = FaultResult("paths/job names from the wire")
    failures = []
    for cmd, args, code in ESCAPES:
        reply = client.request(cmd, args) or {}
        got = reply.get("error", {}).get("code") if not reply.get("ok") else "ok"
        result.count += 1
        if got == code:
            result.survived += 1
        else:
            failures.append(f"{cmd} {args}: {got} (expected {code})")
    jobs = sorted(p.name for p in (area.state_dir / "jobs").iterdir())
    if jobs != ["j"]:
        failures.append(f"job dirs {jobs}")
        result.survived = min(result.survived, result.count - 1)
    result.note(f"{result.count} requests ({', '.join(sorted({c for _, _, c in ESCAPES}))}); job dirs {jobs}"
                + ("; " + "; ".join(failures) if failures else ""))
    return result


def second_daemon(ws: Workspace) -> FaultResult:
    """A second mlxsupd on the same run dir must refuse to start (exit 2) and leave the first one alone."""
    result = FaultResult("second daemon on the same run dir")
    area = ws.area("second-daemon")
    config = area.config({"j": {"checkpoint_every": 50, "budget": "2GiB", "train": {**SMALL, "steps": 10**7}}})
    first = Group(mlxsupd("-c", str(config), "--log-format", "json"), area.root / "first.log", ws.mark)
    second: Group | None = None
    try:
        if not wait_until(lambda: worker_of(first.pid) is not None and answers(area.run_dir, 1.0), 30, 0.1):
            raise RuntimeError("first daemon has no worker")
        second = Group(mlxsupd("-c", str(config), "--log-format", "json"), area.root / "second.log", ws.mark)
        code = second.wait(10)
        stole = code is None and wait_until(lambda: worker_of(second.pid) is not None, 3, 0.1)
        if code is None:
            second.kill(signal.SIGTERM, 30)  # its shutdown unlinks the sockets both daemons share
        sockets = sorted(p.name for p in area.run_dir.glob("*.sock"))
        text = (area.root / "second.log").read_text(errors="replace")
        result.count = 1
        intact = sockets == ["control.sock", "events.sock", "workers.sock"] and answers(area.run_dir, 2.0)
        result.survived = int(code == 2 and "already running" in text and intact)
        result.note(f"second daemon exit {code if code is not None else 'none (still running after 10 s)'}; "
                    f"it spawned a second worker for the same job: {stole}; sockets left {sockets}; "
                    f"first daemon alive: {first.alive()}")
        if code is None:
            result.note("BUG: Daemon._bind_worker_socket closes the run-dir lock it just took")
    finally:
        if second is not None:
            second.kill()
        first.kill(signal.SIGTERM, 30)
        first.kill()
        result.orphans = sweep_orphans(ws.mark, 5)
    return result


@dataclasses.dataclass
class CurveDaemon:
    """A service-mode daemon with a running job "j" and CURVE TCP endpoints on loopback."""

    area: Area
    keys: dict[str, tuple[bytes, bytes]]
    endpoint: str
    events: str
    daemon: Group

    def stop(self, ws: Workspace, results: list[FaultResult]) -> None:
        """SIGTERM (then SIGKILL) the daemon; processes left behind count as orphans of the last result."""
        self.daemon.kill(signal.SIGTERM, 30)
        self.daemon.kill()
        orphans = sweep_orphans(ws.mark, 5)
        if results:
            results[-1].orphans += orphans


def start_curve_daemon(ws: Workspace, name: str, authorized: Callable[[dict[str, tuple[bytes, bytes]], Path], str],
                       extra_keys: tuple[str, ...] = (), events: bool = False) -> CurveDaemon:
    """Keys (server, alice, mallory + ``extra_keys``), the allow-list ``authorized(keys, key_dir)``, the daemon."""
    area = ws.area(name)
    keys = make_keys(area.root / "keys", extra_keys)
    (area.root / "authorized").write_text(authorized(keys, area.root / "keys"))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    events_endpoint = f"tcp://127.0.0.1:{free_port()}" if events else ""
    control = {"tcp": endpoint, "server_key": str(area.root / "keys" / "server.key_secret"),
               "authorized_keys": str(area.root / "authorized"), **({"events_tcp": events_endpoint} if events else {})}
    config = area.config({"j": {"checkpoint_every": 50, "budget": "2GiB", "train": {**SMALL, "steps": 10**7}}},
                         control=control)
    daemon = start_daemon(area, config, ws.mark)
    client = Control.ipc(area.run_dir)
    try:
        if not wait_until(lambda: client.job("j")["state"] == "RUNNING", 30, 0.05):
            daemon.kill()
            raise RuntimeError(f"job j is not running; see {area.root / 'daemon.log'}")
    finally:
        client.close()
    return CurveDaemon(area, keys, endpoint, events_endpoint, daemon)


def run(ws: Workspace) -> list[FaultResult]:
    """Every security check against one daemon."""
    # A keygen .key file as the whole allow-list: the format from before roles (admin).
    started = start_curve_daemon(ws, "security", lambda keys, key_dir: (key_dir / "alice.key").read_text())
    area, keys, endpoint = started.area, started.keys, started.endpoint
    results: list[FaultResult] = []
    try:
        client = Control.ipc(area.run_dir)
        try:
            results.append(curve(area, client, endpoint, keys))
            results.append(run_dir_checks(area, ws))
            results.append(spawn_token(area, client))
            results.append(wire_paths(area, client))
        finally:
            client.close()
    finally:
        started.stop(ws, results)
    return results

