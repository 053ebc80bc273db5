"""Access control against a live daemon over CURVE TCP: roles, the audit trail, revocation of subscribers.

One service-mode daemon with a running job, a CURVE control endpoint and a CURVE event endpoint on loopback,
and an allow-list with one key per role plus a second reader whose key is later revoked:
- role enforcement: every command x every role, with real arguments (the commands really run);
- audit completeness: every state-changing request appears exactly once in audit.jsonl, reads never;
- revoked subscribers: after SIGHUP with the reader's key removed, it receives nothing newer, the other does.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import zmq

from protocol.control import decode_event
from supervisor.control.access import Role
from tests.faults.common import Area, FaultResult, Workspace, json_lines, wait_until
from tests.faults.security import start_curve_daemon
from tests.faults.wire import Control
from tests.test_access import CHANGES, SPEC

# The role each command needs: the table, which tests/test_access.py also walks in-process.
NEEDS: dict[str, Role] = {command: role for command, (_, role) in SPEC.items()}
# Real arguments; run in this order so each role's requests find the job in a state where they make sense.
ARGS: dict[str, dict[str, Any]] = {
    "status": {"job": "j"}, "history": {"job": "j", "limit": 5}, "tail": {"job": "j", "stream": "stderr"},
    "version": {}, "help": {}, "checkpoint": {"job": "j"}, "budget": {"job": "j", "value": "2GiB"},
    "signal": {"job": "j", "signal": "CONT"}, "reread": {}, "update": {}, "restart": {"job": "j"},
    "stop": {"job": "j"}, "start": {"job": "j"}, "audit": {"limit": 5}, "shutdown": {},
}
NAMES = {Role.READ: "reader", Role.OPERATE: "operator", Role.ADMIN: "admin"}


def allow_list(keys: dict[str, tuple[bytes, bytes]], *names: str) -> str:
    roles = {"reader": "read", "viewer": "read", "operator": "operate", "admin": "admin"}
    return "".join(f'public-key = "{keys[n][0].decode()}" role = "{roles[n]}" name = "{n}"\n' for n in names)


def role_matrix(area: Area, endpoint: str, keys: dict[str, tuple[bytes, bytes]],
                sent: dict[str, str]) -> FaultResult:
    """Every command x every role over CURVE: `forbidden` exactly when the role is below the command's."""
    result = FaultResult("roles: every command x every role")
    wrong: list[str] = []
    server = keys["server"][0]
    for role in Role:
        name = NAMES[role]
        client = Control(endpoint, (keys[name][0], keys[name][1], server))
        try:
            for command, args in ARGS.items():
                reply = client.request(command, args, timeout=10.0) or {"ok": False, "error": {"code": "no reply"}}
                code = "ok" if reply.get("ok") else str(reply.get("error", {}).get("code"))
                sent[client.last_id] = f"{name}:{command}:{code}"
                result.count += 1
                if (code == "forbidden") == (role < NEEDS[command]) and code != "no reply":
                    result.survived += 1
                else:
                    wrong.append(f"{name} {command}: {code}")
        finally:
            client.close()
    forbidden = sum(v.endswith(":forbidden") for v in sent.values())
    result.note(f"{result.count} requests, {forbidden} forbidden (read 10, operate 5 expected)"
                + ("; WRONG: " + ", ".join(wrong) if wrong else ""))
    return result


def audit_completeness(area: Area, sent: dict[str, str], ipc_sent: dict[str, str]) -> FaultResult:
    """Each state-changing request (accepted, failed or forbidden) appears exactly once; reads never."""
    result = FaultResult("audit: every state-changing request once")
    records = json_lines(area.state_dir / "audit.jsonl")
    ids = [str(r.get("id")) for r in records if "id" in r]
    problems = []
    for request_id, what in {**sent, **ipc_sent}.items():
        _, command, code = what.split(":")
        expected = 1 if command in CHANGES or code == "forbidden" else 0
        result.count += 1
        seen = ids.count(request_id)
        if seen == expected:
            result.survived += 1
        else:
            problems.append(f"{what} seen {seen}x")
    history = json_lines(area.job_dir("j") / "history.jsonl")
    clients = sorted({str(e["client"]) for e in history if "client" in e})
    if "reader" in clients:
        problems.append("a forbidden request reached the job's history")
        result.survived = min(result.survived, result.count - 1)
    refused = [r for r in records if r.get("error") in ("unauthenticated", "revoked")]
    result.note(f"{len(records)} records for {result.count} requests ({sum(c in CHANGES for c in _commands(sent))}"
                f" state-changing over CURVE, {len(ipc_sent)} over ipc); operator clients in the job history: "
                f"{clients}; refused connections recorded: {len(refused)}"
                + ("; " + "; ".join(problems[:5]) if problems else ""))
    result.extra["audit_records"] = len(records)
    return result


def _commands(sent: dict[str, str]) -> list[str]:
    return [what.split(":")[1] for what in sent.values()]


def revoked_subscriber(area: Area, daemon_pid: int, events: str, keys: dict[str, tuple[bytes, bytes]],
                       ipc: Control) -> FaultResult:
    """Two readers follow the telemetry; one key is removed and SIGHUP sent: it receives nothing newer."""
    result = FaultResult("revoked event subscriber")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    subs: dict[str, zmq.Socket[bytes]] = {}
    steps: dict[str, list[tuple[int, float]]] = {"reader": [], "viewer": []}
    try:
        for name in steps:
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.curve_publickey, sub.curve_secretkey = keys[name]
            sub.curve_serverkey = keys["server"][0]
            sub.setsockopt(zmq.SUBSCRIBE, b"job.j.telemetry")
            sub.connect(events)
            subs[name] = sub

        def listen(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for name, sub in subs.items():
                    while sub.poll(0):
                        steps[name].append((int(decode_event(sub.recv_multipart()[1])["step"]), time.monotonic()))
                time.sleep(0.01)

        listen(2.0)
        before = {n: len(v) for n, v in steps.items()}
        (area.root / "authorized").write_text(allow_list(keys, "reader", "operator", "admin"))  # viewer goes
        sent_at = time.monotonic()
        log = area.root / "daemon.log"
        rebinds = log.read_text(errors="replace").count('"events_rebound"')
        os.kill(daemon_pid, signal.SIGHUP)  # the in-process test covers reread + update
        wait_until(lambda: log.read_text(errors="replace").count('"events_rebound"') > rebinds, 10, 0.02)
        reloaded_at = time.monotonic()
        step_at_reload = int(ipc.job("j")["step"])
        listen(2.5)
        late = [s for s, t in steps["viewer"] if t > reloaded_at and s > step_at_reload]
        kept = [t for s, t in steps["reader"] if s > step_at_reload]
        result.count = 1
        result.survived = int(min(before.values()) > 0 and not late and len(kept) >= 3)
        last_viewer = max((t for _, t in steps["viewer"]), default=sent_at)
        result.note(f"before: {before}; reload (SIGHUP to events_rebound) {reloaded_at - sent_at:.2f}s; revoked "
                    f"subscriber's last event {last_viewer - sent_at:+.2f}s after SIGHUP, events newer than step "
                    f"{step_at_reload}: {len(late)}; authorized subscriber: {len(kept)} newer events, first "
                    f"{(kept[0] - reloaded_at if kept else float('nan')):.2f}s after the rebind")
        result.extra["revocation_seconds"] = round(reloaded_at - sent_at, 3)
    finally:
        for sub in subs.values():
            sub.close(linger=0)
        context.term()
    return result


def unauthenticated(endpoint: str, keys: dict[str, tuple[bytes, bytes]], ipc: Control) -> FaultResult:
    """An unlisted key gets no answer; the attempts are counted (version shows the counters)."""
    result = FaultResult("unauthenticated attempts counted")
    before = ipc.result("version")["control"]["refused"].get("unauthenticated", 0)
    for _ in range(3):
        intruder = Control(endpoint, (keys["mallory"][0], keys["mallory"][1], keys["server"][0]))
        try:
            answered = intruder.request("version", timeout=0.5) is not None
        finally:
            intruder.close()
        result.count += 1
        result.survived += int(not answered)
    def counted() -> int:
        return int(ipc.result("version")["control"]["refused"].get("unauthenticated", 0))

    # A loaded daemon may answer the last handshake's ZAP request after the intruder gave up waiting.
    wait_until(lambda: counted() - before >= 3, 10, 0.1)
    after = counted()
    if after - before < 3:
        result.survived = 0
    result.note(f"3 connections with an unlisted key: answered {result.count - result.survived}, counted "
                f"{after - before} refused handshakes")
    return result


def run(ws: Workspace) -> list[FaultResult]:
    names = ("reader", "viewer", "operator", "admin")
    started = start_curve_daemon(ws, "access", lambda keys, _: allow_list(keys, *names), names, events=True)
    area, keys, endpoint, events, daemon = (started.area, started.keys, started.endpoint, started.events,
                                            started.daemon)
    results: list[FaultResult] = []
    try:
        ipc = Control.ipc(area.run_dir)
        try:
            results.append(revoked_subscriber(area, daemon.pid, events, keys, ipc))
            results.append(unauthenticated(endpoint, keys, ipc))
            ipc_sent = local_requests(ipc)
            sent: dict[str, str] = {}
            results.append(role_matrix(area, endpoint, keys, sent))  # ends with the admin's shutdown
        finally:
            ipc.close()
        code = daemon.wait(60)
        results[-1].note(f"daemon after the admin's shutdown: exit {code}")
        if code != 0:
            results[-1].survived = min(results[-1].survived, results[-1].count - 1)
        results.append(audit_completeness(area, sent, ipc_sent))
    finally:
        started.stop(ws, results)
    return results


def local_requests(ipc: Control) -> dict[str, str]:
    """Requests over the ipc socket (admin, client "local"), including ones that fail after the role check."""
    sent = {}
    for command, args in (("budget", {"job": "j", "value": "1"}), ("budget", {"job": "j"}),
                          ("start", {"job": "nosuch"}), ("checkpoint", {"job": "j"}), ("status", {}),
                          ("signal", {"job": "j", "signal": "BOGUS"}), ("stop", {"job": "j", "extra": 1})):
        reply = ipc.request(command, args) or {}
        code = "ok" if reply.get("ok") else str(reply.get("error", {}).get("code"))
        shown = "budget-show" if command == "budget" and "value" not in args else command  # that one only reads
        sent[ipc.last_id] = f"local:{shown}:{code}"
    return sent

