"""Roles, the audit trail, revocation of event subscribers and budget sanity.

The role matrix and audit tests drive the daemon's real control server in-process (real DaemonService, real
sockets and files, no worker); the revocation test uses real CURVE sockets over loopback TCP. End-to-end runs
with a live daemon are in the fault campaign (tests/faults/access.py).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from protocol.control import ControlError, decode_event
from supervisor.config import ConfigError, load_config
from supervisor.control.access import LOCAL, Principal, Role, read_authorized_keys
from supervisor.control.audit import AuditTrail, RateLimit
from supervisor.control.commands import REGISTRY
from supervisor.daemon.history import read_jsonl
from supervisor.daemon.server import DaemonService
from tests.faults.security import make_keys
from tests.test_job_fake import Harness, MiB

KEY = "iR+c]@Nlb@)e8u#NeVdOov8@Io&.J3SWlk03e+<<"
OTHER = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

# The table: the role each command needs. A command missing here fails the matrix (declare it first).
SPEC: dict[str, tuple[dict[str, Any], Role]] = {
    "status": ({}, Role.READ),
    "history": ({"job": "nosuch"}, Role.READ),
    "tail": ({"job": "nosuch"}, Role.READ),
    "version": ({}, Role.READ),
    "help": ({}, Role.READ),
    "budget": ({"job": "nosuch", "value": "1GiB"}, Role.OPERATE),
    "start": ({"job": "nosuch"}, Role.OPERATE),
    "stop": ({"job": "nosuch"}, Role.OPERATE),
    "restart": ({"job": "nosuch"}, Role.OPERATE),
    "checkpoint": ({"job": "nosuch"}, Role.OPERATE),
    "explain": ({"job": "nosuch"}, Role.READ),
    "diagnose": ({"job": "nosuch", "steps": 10}, Role.OPERATE),
    "signal": ({"job": "nosuch", "signal": "TERM"}, Role.ADMIN),
    "reread": ({}, Role.ADMIN),
    "update": ({}, Role.ADMIN),
    "shutdown": ({}, Role.ADMIN),
    "audit": ({}, Role.ADMIN),
    "gang-sync": ({"job": "nosuch", "host": "h", "layout": "[]", "epoch": "e", "gen": 0, "alive": 0, "want": True},
                  Role.OPERATE),
}
CHANGES = {"budget", "start", "stop", "restart", "checkpoint", "signal", "reread", "update", "shutdown", "diagnose"}


@pytest.fixture
def service(config_file: Any) -> Iterator[DaemonService]:
    """A real daemon service (sockets bound, audit trail on disk) whose loop is not running: no worker."""
    path = config_file({"j": {"autostart": False}})
    svc = DaemonService(load_config(path))
    yield svc
    svc.close()


def ask(svc: DaemonService, principal: Principal, cmd: str, args: dict[str, Any], request_id: str) -> str:
    """The outcome of one request through the real dispatcher: "ok" or the error code."""
    try:
        svc.control.dispatch(cmd, dict(args), principal, request_id, time.monotonic())
    except ControlError as exc:
        return exc.code
    return "ok"


class TestRoleMatrix:
    """Every command x every role: refused with `forbidden` exactly when the role is below the spec."""

    def test_every_command_is_in_the_spec(self) -> None:
        assert set(SPEC) == set(REGISTRY)
        assert {name for name, c in REGISTRY.items() if c.changes_state(SPEC[name][0])} == CHANGES
        assert not REGISTRY["budget"].changes_state({"job": "j"})  # showing a budget is not audited

    def test_every_command_times_every_role(self, service: DaemonService) -> None:
        outcomes: dict[tuple[str, str], str] = {}
        for role in Role:
            principal = Principal(f"{role.label}-key", role)
            for cmd, (args, needed) in SPEC.items():
                outcome = ask(service, principal, cmd, args, f"{role.label}-{cmd}")
                outcomes[cmd, role.label] = outcome
                assert (outcome == "forbidden") == (role < needed), (cmd, role, outcome)
        assert sum(o == "forbidden" for o in outcomes.values()) == 12 + 5  # read: 12 refused, operate: 5
        # Showing a budget is reading; changing it is operating.
        reader = Principal("r", Role.READ)
        assert ask(service, reader, "budget", {"job": "j"}, "show") == "ok"
        assert ask(service, reader, "budget", {"job": "j", "value": "1GiB"}, "change") == "forbidden"

    def test_forbidden_names_the_role_that_would_allow_it(self, service: DaemonService) -> None:
        with pytest.raises(ControlError) as caught:
            service.control.dispatch("stop", {"job": "j"}, Principal("grafana", Role.READ))
        assert caught.value.code == "forbidden"
        assert "needs role operate" in caught.value.message and "'grafana' has role read" in caught.value.message
        assert service.daemon.jobs["j"].history.events == []  # nothing happened to the job

    def test_local_socket_is_admin(self, service: DaemonService) -> None:
        assert LOCAL.role is Role.ADMIN
        assert ask(service, LOCAL, "signal", {"job": "nosuch", "signal": "TERM"}, "x") == "no_such_job"


class TestAuditTrail:
    """State-changing requests appear once each with their outcome; reads never; refusals counted."""

    def test_every_state_changing_request_exactly_once(self, service: DaemonService) -> None:
        service.control.audit.limit = RateLimit(burst=1000)  # refusals are rate-limited: see the test below
        sent: dict[str, tuple[str, bool]] = {}  # id -> (outcome, audited)
        for number in range(3):
            for role in Role:
                for cmd, (args, _) in SPEC.items():
                    if cmd == "shutdown":
                        continue
                    request_id = f"{number}-{role.label}-{cmd}"
                    outcome = ask(service, Principal(role.label, role), cmd, args, request_id)
                    sent[request_id] = (outcome, cmd in CHANGES)
        records = read_jsonl(service.config.state_dir / "audit.jsonl")
        ids = [r["id"] for r in records]
        for request_id, (outcome, changes) in sent.items():
            expected = 1 if changes or outcome == "forbidden" else 0
            assert ids.count(request_id) == expected, (request_id, outcome)
        by_id = {r["id"]: r for r in records}
        assert by_id["0-admin-start"]["error"] == "no_such_job" and by_id["0-admin-start"]["client"] == "admin"
        assert by_id["0-admin-reread"]["result"] == {"added": [], "removed": [], "changed": []}
        assert by_id["0-read-stop"]["error"] == "forbidden" and by_id["0-read-stop"]["role"] == "read"
        counters = service.control.audit.counters()
        assert counters["refused"] == {"forbidden": 3 * (11 + 4)}  # shutdown left out
        assert counters["audit_records"] == len(records)

    def test_operator_actions_name_the_client_in_the_job_history(self, service: DaemonService) -> None:
        job = service.daemon.jobs["j"]
        service.control.dispatch("budget", {"job": "j", "value": "1GiB"}, Principal("ops-laptop", Role.OPERATE), "1")
        assert job.history.events[-1]["event"] == "budget" and job.history.events[-1]["client"] == "ops-laptop"
        service.control.dispatch("shutdown", {}, Principal("admin-key", Role.ADMIN), "2")
        assert service.daemon.stopped_by == "admin-key"

    def test_arguments_too_deep_to_record_are_still_audited(self, service: DaemonService) -> None:
        nested: Any = "j"
        for _ in range(1000):  # msgpack decodes up to 1024 levels; json.dumps gives up around 1000
            nested = [nested]
        assert ask(service, LOCAL, "stop", {"job": nested}, "deep") == "bad_request"
        record = read_jsonl(service.config.state_dir / "audit.jsonl")[-1]
        # Python 3.11/3.12 give up serializing (unprintable); 3.13's json goes deeper, so the record is cut short.
        assert record["id"] == "deep" and len(record["args"]) == 1
        unprintable = record["args"].get("unprintable") == "arguments nested too deep to record"
        assert unprintable or "truncated" in record["args"]

    def test_rotates_like_the_logs_and_reads_back_across_files(self, tmp_path: Path) -> None:
        trail = AuditTrail(tmp_path / "audit.jsonl", max_bytes=2000, keep=2)
        for number in range(100):
            trail.record("alice", "stop", id=str(number), args={"job": "j"}, result={"state": "STOPPING"})
        assert (tmp_path / "audit.jsonl.1").exists() and (tmp_path / "audit.jsonl.2").exists()
        assert not (tmp_path / "audit.jsonl.3").exists()
        assert all(p.stat().st_size < 2000 + 200 for p in tmp_path.iterdir())  # rotated before the line that passes
        tail = trail.tail(20)
        assert [r["id"] for r in tail] == [str(n) for n in range(80, 100)]
        assert oct((tmp_path / "audit.jsonl").stat().st_mode & 0o777) == "0o600"

    def test_a_write_failure_is_counted_never_raised(self, tmp_path: Path) -> None:
        (tmp_path / "not-a-dir").write_text("")
        trail = AuditTrail(tmp_path / "not-a-dir" / "audit.jsonl", max_bytes=0, keep=1)
        for _ in range(3):
            trail.record("local", "start", args={"job": "j"}, result={})
        assert trail.counters()["audit_write_failures"] == 3 and trail.counters()["audit_records"] == 0

    def test_refusals_are_counted_exactly_and_written_rate_limited(self, tmp_path: Path) -> None:
        trail = AuditTrail(tmp_path / "audit.jsonl", max_bytes=0, keep=1)
        trail.limit = RateLimit(burst=5, window=10.0)
        for index in range(100):
            trail.refuse("unauthenticated", "unknown@10.0.0.9", 1000.0 + index * 0.01, command="connect")
        assert trail.counters()["refused"] == {"unauthenticated": 100}
        assert len(read_jsonl(tmp_path / "audit.jsonl")) == 5
        trail.refuse("unauthenticated", "unknown@10.0.0.9", 1020.0, command="connect")  # next window
        last = read_jsonl(tmp_path / "audit.jsonl")[-1]
        assert last["suppressed_before"] == 95 and last["error"] == "unauthenticated"


class TestBudgetBands:
    """Bands out of order are refused even with --force (the escalation needs them in order); both audited."""

    def test_bands_out_of_order_are_never_applied(self, config_file: Any) -> None:
        svc = DaemonService(load_config(config_file({"j": {"autostart": False, "budget": "4GiB", "warn": "3GiB"}})))
        try:
            operator = Principal("ana", Role.OPERATE)
            for request_id, force in (("a", {}), ("b", {"force": True})):
                with pytest.raises(ControlError) as caught:
                    svc.control.dispatch("budget", {"job": "j", "value": "2GiB", **force}, operator, request_id)
                assert caught.value.code == "bad_value"
                assert "warn 3.00 GiB, budget 2.00 GiB" in caught.value.message
            assert svc.daemon.jobs["j"].limits.budget == 4 * 2**30
            records = {r["id"]: r for r in read_jsonl(svc.config.state_dir / "audit.jsonl")}
            assert records["a"]["error"] == records["b"]["error"] == "bad_value"
            assert records["b"]["args"]["force"] is True and records["b"]["client"] == "ana"
        finally:
            svc.close()


class TestAuthorizedKeys:
    """The allow-list: roles and names per line; bare keys and keygen files keep meaning admin."""

    def test_roles_names_and_the_old_formats(self, tmp_path: Path) -> None:
        path = tmp_path / "keys"
        path.write_text(f'# a comment\n\npublic-key = "{KEY}" role = "read" name = "grafana"\n{OTHER}\n')
        keys = read_authorized_keys(path)
        assert keys[KEY.encode()] == Principal("grafana", Role.READ)
        assert keys[OTHER.encode()].role is Role.ADMIN and keys[OTHER.encode()].name == f"key:{OTHER[:8]}"
        certificate = f'#  ZeroMQ CURVE Public Certificate\nmetadata\n    name = "x"\ncurve\n    public-key = "{KEY}"\n'
        path.write_text(certificate)
        assert read_authorized_keys(path) == {KEY.encode(): Principal(f"key:{KEY[:8]}", Role.ADMIN)}

    def test_keygen_files_concatenated(self, tmp_path: Path) -> None:
        for name in ("alice", "bob"):
            zmq.auth.create_certificates(str(tmp_path), name)
        path = tmp_path / "authorized"
        path.write_text((tmp_path / "alice.key").read_text() + (tmp_path / "bob.key").read_text())
        keys = read_authorized_keys(path)
        assert len(keys) == 2 and {p.role for p in keys.values()} == {Role.ADMIN}

    def test_the_documented_example(self, tmp_path: Path) -> None:
        readme = (Path(__file__).resolve().parent.parent / "docs" / "remote.md").read_text()
        block = readme.split("# authorized_keys:", 1)[1].split("```", 1)[0]
        path = tmp_path / "keys"
        path.write_text("# authorized_keys:" + block)
        roles = {p.name: p.role for p in read_authorized_keys(path).values()}
        assert roles == {"grafana": Role.READ, "ana-laptop": Role.OPERATE, "ops": Role.ADMIN}

    @pytest.mark.parametrize(("text", "message"), [
        ("too-short\n", "keys:1: 'too-short' is not a 40-char Z85 public key"),
        (f'public-key = "{KEY}" role = "root"\n', "role 'root' is not one of read, operate, admin"),
        (f'public-key = "{KEY}" colour = "red"\n', "unknown field(s) ['colour']"),
        (f'public-key = "{KEY}" name = "bad name"\n', "name 'bad name'"),
        (f'public-key = "{KEY}" name = "local"\n', "name 'local'"),
        (f'public-key = "{KEY}" role = read\n', "expected name = \"value\" pairs"),
        (f'{KEY}\npublic-key = "{KEY}" role = "read"\n', "keys:2: key listed twice"),
        (f'public-key = "{KEY}" name = "a"\npublic-key = "{OTHER}" name = "a"\n', "name 'a' already used on line 1"),
        ('    secret-key = "x"\n', "a secret key; list public keys only"),
    ])
    def test_bad_lines_name_the_line_and_the_problem(self, tmp_path: Path, text: str, message: str) -> None:
        path = tmp_path / "keys"
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            read_authorized_keys(path)
        assert message in str(caught.value)


class TestBudgetSanityFake:
    """`budget` refuses a change that cannot work, with the numbers (fake OS: exact footprints)."""

    def test_below_baseline_or_kill_under_the_footprint(self, tmp_path: Path) -> None:
        from supervisor.control.commands.budget import budget_problems
        from supervisor.core.policy import Limits

        h = Harness(tmp_path)
        for step in range(1, 8):
            h.step(step, footprint=400 * MiB)
        h.sample(420 * MiB)
        assert budget_problems(h.job, Limits(300 * MiB, 350 * MiB, 385 * MiB)) == [
            "budget 350.0 MiB is below the job's measured baseline 400.0 MiB (its footprint between steps): no "
            "batch size fits under it",
            "kill ceiling 385.0 MiB is at or below the current footprint 420.0 MiB: the worker would be killed at "
            "once, without a checkpoint"]
        assert budget_problems(h.job, Limits(425 * MiB, 500 * MiB, 550 * MiB)) == []  # under budget: a shrink

    def test_operator_history_names_the_client(self, tmp_path: Path) -> None:
        h = Harness(tmp_path)  # started without naming a client: "local"
        h.job.set_limits(h.job.limits, client="alice")
        h.job.checkpoint(client="bob")
        assert h.job.signal(signal.SIGCONT, client="dave")
        h.job.stop(h.system.clock, "stop requested", client="carol")
        records = [(e["event"], e.get("new"), e.get("client")) for e in h.job.history.events]
        assert records[0] == ("state", "STARTING", "local")
        assert ("budget", None, "alice") in records and ("signal", None, "dave") in records
        assert ("state", "STOPPING", "carol") in records
        assert h.sent[-2].reason == "requested by bob"  # the checkpoint command, before the stop's


def curve_service(config_file: Any, tmp_path: Path) -> tuple[DaemonService, dict[str, tuple[bytes, bytes]], Path]:
    """A daemon service with a CURVE event endpoint on loopback; readers alice and bob are authorized."""
    keys = make_keys(tmp_path / "keys", ("bob",))
    authorized = tmp_path / "authorized"
    authorized.write_text("".join(f'public-key = "{keys[n][0].decode()}" role = "read" name = "{n}"\n'
                                  for n in ("alice", "bob")))
    control = {"events_tcp": "tcp://127.0.0.1:0", "server_key": str(tmp_path / "keys" / "server.key_secret"),
               "authorized_keys": str(authorized)}
    return DaemonService(load_config(config_file({"j": {"autostart": False}}, control=control))), keys, authorized


class TestEventRevocation:
    """A subscriber whose key is removed stops receiving within one reload; an authorized one goes on."""

    def test_a_bad_allow_list_is_refused_by_reread_and_changes_nothing(self, config_file: Any,
                                                                       tmp_path: Path) -> None:
        svc, _, authorized = curve_service(config_file, tmp_path)
        try:
            before = dict(svc.control.keys)
            authorized.write_text('public-key = "short" role = "read"\n')
            with pytest.raises(ControlError, match=r"config not reloaded: .*not a 40-char Z85 public key"):
                svc.control.dispatch("reread", {}, LOCAL)
            assert svc.pending is None and svc.control.keys == before
        finally:
            svc.close()

    def test_revoked_subscriber_is_cut_off(self, config_file: Any, tmp_path: Path) -> None:
        svc, keys, authorized = curve_service(config_file, tmp_path)
        lines = {n: f'public-key = "{keys[n][0].decode()}" role = "read" name = "{n}"\n' for n in ("alice", "bob")}
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        subs = {}
        try:
            for name in ("alice", "bob"):
                sub = context.socket(zmq.SUB)
                sub.setsockopt(zmq.LINGER, 0)
                sub.curve_publickey, sub.curve_secretkey = keys[name]
                sub.curve_serverkey = keys["server"][0]
                sub.setsockopt(zmq.SUBSCRIBE, b"job.")
                sub.connect(svc.control.events_tcp)
                subs[name] = sub
            handlers = svc.control.sockets()
            received: dict[str, list[int]] = {"alice": [], "bob": []}  # sequence numbers of the events
            published = [0]

            def pump(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    for sock, handler in handlers.items():
                        if sock.poll(0):
                            handler(time.monotonic())
                    published[0] += 1
                    svc.control.publish("j", "telemetry", {"seq": published[0]})
                    for name, sub in subs.items():
                        while sub.poll(0):
                            received[name].append(decode_event(sub.recv_multipart()[1])["seq"])
                    time.sleep(0.005)

            pump(1.5)
            assert received["alice"] and received["bob"], "both subscribers receive before the revocation"
            authorized.write_text(lines["alice"])  # revoke bob
            started = time.monotonic()
            svc.update("admin")
            reload_seconds = time.monotonic() - started
            cut = published[0]  # every event after this one was published after the reload
            pump(2.0)
            bob_after = [seq for seq in received["bob"] if seq > cut]
            alice_after = [seq for seq in received["alice"] if seq > cut]
            assert bob_after == [], "the revoked subscriber still receives events published after the reload"
            assert len(alice_after) > 50, "the authorized subscriber keeps receiving (it reconnected by itself)"
            print(f"reload + rebind {reload_seconds:.3f}s; alice missed {alice_after[0] - cut - 1} events while "
                  f"reconnecting, then received {len(alice_after)}")
            refused = svc.control.audit.counters()["refused"]
            assert refused.get("unauthenticated", 0) >= 1  # bob's reconnects are refused at the handshake
        finally:
            for sub in subs.values():
                sub.close(linger=0)
            context.term()
            svc.close()


def test_audit_file_is_private(service: DaemonService) -> None:
    """The trail names clients and what they asked for: created 0600 inside the state dir."""
    service.control.dispatch("reread", {}, LOCAL, "1")
    path = service.config.state_dir / "audit.jsonl"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert json.loads(path.read_text().splitlines()[-1])["client"] == "local"
