"""A worker written from docs/PROTOCOL.md alone (no SDK, no MLX), with switches that break one rule each.

``python tests/_ref_worker.py --steps N [--step-ms MS] [--break MODE] [--future]``. With no ``--break`` it
follows the spec, so the conformance kit must pass it; each MODE breaks the rule one check is about, so that
check must FAIL. ``--future`` plays a newer worker: hello offers protocol 3 and every frame carries extra fields.
It honours the kit's steering variables (a slow load, slow steps: PROTOCOL.md section 9) the way a worker with
a real long load or evaluation would: heartbeats every second meanwhile, and an orphan watchdog.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from protocol.checkpoints import (
    SCRATCH,
    CheckpointDamaged,
    checkpoint_name,
    hash_file,
    list_checkpoints,
    step_of,
    verify,
)
from protocol.messages import (
    CheckpointSaved,
    Command,
    Goodbye,
    Heartbeat,
    Hello,
    ProtocolError,
    Step,
    Steps,
    Welcome,
    decode,
)

MODES = ("wrong_token", "ms_seconds", "mid_step_checkpoint", "bad_hash", "acts_on_invalid", "crash_on_garbage",
         "strict_fields", "exit_zero", "fresh_start", "deaf", "no_sigterm", "keep_all", "no_finish_goodbye",
         "reads_parts", "steps_past_target",
         # the 1.1 duties
         "overfull_steps", "no_flush_at_command", "silent_load", "term_at_boundary_only", "waits_for_welcome",
         "trusts_newest", "drops_trash", "ignores_parent", "no_keepalive", "no_watchdog", "timer_from_start")


def _env_number(name: str, kind: type[Any]) -> Any:
    raw = os.environ.get(name) or "0"
    try:
        return kind(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a valid {kind.__name__}") from None


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.mode, env = args, args.mode, os.environ
        self.dir = Path(env["MLXSUP_CHECKPOINT_DIR"])
        self.batch, self.accum = int(env.get("MLXSUP_BATCH") or 4), int(env.get("MLXSUP_ACCUM") or 1)
        self.keep = int(env.get("MLXSUP_KEEP_CHECKPOINTS") or 3)
        self.orphan_timeout = float(env.get("MLXSUP_ORPHAN_TIMEOUT") or 5)
        self.load_seconds = _env_number("MLXSUP_CONFORMANCE_LOAD_SECONDS", float)
        self.slow_every = _env_number("MLXSUP_CONFORMANCE_SLOW_EVERY", int)
        self.slow_seconds = _env_number("MLXSUP_CONFORMANCE_SLOW_SECONDS", float)
        self.parent, self.stop_reason = os.getppid(), ""
        self.last_heard = float("inf")  # the orphan timer starts at the hello
        if self.mode == "timer_from_start":
            self.last_heard = time.time()  # broken: a long load counts as the daemon's silence
        self.stepped = self.welcomed = False
        self.grant: Heartbeat | None = None  # the newest heartbeat that allows holding
        self.held: list[Step] = []
        self.held_since = 0.0
        self.inbox: list[Command] = []
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(env["MLXSUP_ENDPOINT"])
        if self.mode != "no_sigterm":
            signal.signal(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self, *_: object) -> None:
        self.stop_reason = "sigterm"
        if not self.stepped and self.mode != "term_at_boundary_only":
            os._exit(75)  # no step since the checkpoint it loaded: nothing to save (PROTOCOL.md 8)

    def send(self, message: Any) -> None:
        if not isinstance(message, Step | Steps) and self.mode != "no_flush_at_command":
            self.flush()  # held steps go before any other frame
        body = {"v": 1, "t": message.TAG, **{k: v for k, v in dataclasses.asdict(message).items() if v is not None}}
        if self.args.v1_only and body["t"] == "hello":
            body.pop("protocol", None)  # a 1.0 hello has no protocol field
        if self.args.future:
            body.update({"protocol": 3} if body["t"] == "hello" else {}, gpu_watts=12.5, notes=["from v3"])
        self.sock.send(msgpack.packb(body, use_bin_type=True))

    def flush(self) -> None:
        held, self.held = self.held, []
        rows = self.grant.hold_rows if self.grant is not None and self.grant.hold_rows else 1
        rows = rows + 3 if self.mode == "overfull_steps" else rows
        for start in range(0, len(held), rows):
            chunk = held[start:start + rows]
            self.send(chunk[0] if len(chunk) == 1 else Steps.of(chunk))

    def report(self, step: Step) -> None:
        """Send a step, or hold it while the daemon allows (every step is calm here: no memory to speak of)."""
        grant = self.grant
        if grant is None or not self.stepped or grant.hold is None or grant.hold_below is None \
                or grant.hold_horizon is None or grant.hold <= 0 or step.footprint >= grant.hold_below:
            self.flush()
            self.send(step)
            return
        if not self.held:
            self.held_since = time.monotonic()
        self.held.append(step)
        if time.monotonic() - self.held_since >= grant.hold:
            self.flush()

    def restore_trash(self) -> None:
        """Rename back the .trash of a dead writer whose checkpoint is missing (PROTOCOL.md 6)."""
        for entry in sorted(self.dir.glob(".trash-ckpt-*")) if self.dir.is_dir() else []:
            match = SCRATCH.fullmatch(entry.name)
            if match is None or psutil.pid_exists(int(match.group(3))):
                continue
            final = self.dir / checkpoint_name(int(match.group(2)))
            if self.mode == "drops_trash":
                shutil.rmtree(entry, ignore_errors=True)
            elif not final.exists():
                os.rename(entry, final)

    def resume(self) -> int:
        self.restore_trash()
        for path in reversed(list_checkpoints(self.dir)):
            try:
                if self.mode != "trusts_newest":
                    verify(path)
            except CheckpointDamaged:
                continue
            return 0 if self.mode == "fresh_start" else step_of(path)
        return 0

    def busy(self, seconds: float, keepalive: bool) -> None:
        """Long work (a load, an evaluation): heartbeats every second, and the orphan watchdog."""
        deadline, beat, orphaned = time.monotonic() + seconds, 0.0, 0.0
        while (now := time.monotonic()) < deadline:
            if keepalive and now >= beat:
                self.send(Heartbeat(time.time(), os.environ["MLXSUP_TOKEN"]))
                beat = now + 1.0
            self.read()
            if self.orphan_reason() and self.mode != "no_watchdog":
                orphaned = orphaned or now
                if now - orphaned >= self.orphan_timeout / 2:
                    os._exit(75)  # mid-step: no checkpoint, no goodbye; the last durable checkpoint stands
            time.sleep(0.05)

    def read(self) -> None:
        """Take every pending frame: commands to the inbox, heartbeats as signs of life and holding grants."""
        while self.sock.poll(0):
            parts = self.sock.recv_multipart() if self.mode != "reads_parts" else [self.sock.recv()]
            if len(parts) != 1:
                continue  # a multi-part message is refused whole (PROTOCOL.md 2)
            frame = parts[0]
            if self.mode == "acts_on_invalid":  # a lenient reader: anything with an action is a command
                try:
                    body = msgpack.unpackb(frame)
                except Exception:
                    continue
                if isinstance(body, dict) and "action" in body:
                    self.inbox.append(Command(str(body["action"]), str(body.get("reason", ""))))
                continue
            if self.args.v1_only and msgpack.unpackb(frame).get("v") != 1:
                print("refused a frame that is not version 1", flush=True)  # a 1.0 worker reads nothing newer
                continue
            try:
                message = decode(frame)
            except ProtocolError:
                if self.mode == "crash_on_garbage":
                    raise
                continue
            if self.mode == "strict_fields" and len(msgpack.unpackb(frame)) > 2 + len(dataclasses.fields(message)):
                continue  # refuses what it does not know
            self.last_heard = max(self.last_heard, message.sent_at if isinstance(message, Heartbeat) else time.time())
            if isinstance(message, Welcome):
                self.welcomed = True
                print(f"welcome protocol={message.protocol}", flush=True)
            if isinstance(message, Heartbeat):
                self.grant = message
            if isinstance(message, Command):
                self.inbox.append(message)
                if self.mode != "no_flush_at_command":
                    self.flush()
                    self.grant = None  # no holding until the next heartbeat

    def orphan_reason(self) -> str:
        """daemon_lost (re-parented), daemon_silent (nothing heard for the orphan timeout since the hello) or ''."""
        if self.mode == "deaf":
            return ""
        if self.mode != "ignores_parent" and os.getppid() != self.parent:
            return "daemon_lost"
        return "daemon_silent" if time.time() - self.last_heard > self.orphan_timeout else ""

    def save(self, step: int) -> None:
        started = time.time()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".tmp-ckpt-{step}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        (tmp / "state.json").write_text(json.dumps({"step": step, "weights": [step * 0.5] * 64}))
        digest, size = hash_file(tmp / "state.json", sync=True)
        if self.mode == "bad_hash":
            digest = "0" * 64
        meta = {"format": 1, "step": step, "created": time.time(), "files": {"state.json": {"sha256": digest,
                                                                                          "bytes": size}}}
        (tmp / "meta.json").write_text(json.dumps(meta))
        final = self.dir / checkpoint_name(step)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        older = [p for p in list_checkpoints(self.dir) if step_of(p) < step]
        for old in older[: max(0, len(older) - self.keep + 1)] if self.mode != "keep_all" else []:
            shutil.rmtree(old, ignore_errors=True)
        nbytes = sum(p.stat().st_size for p in final.iterdir())
        self.send(CheckpointSaved(step, str(final), time.time() - started, nbytes))

    def leave(self, reason: str, step: int, code: int) -> None:
        self.send(Goodbye(reason, step))
        self.sock.close(linger=0 if reason.startswith("daemon_") else 1000)
        sys.exit(code)

    def boundary(self, step: int) -> None:
        self.read()
        actions = {c.action: c.reason for c in self.inbox}
        self.inbox = []
        self.stop_reason = self.stop_reason or self.orphan_reason()
        if self.stop_reason:
            actions.setdefault(Command.CHECKPOINT_EXIT, self.stop_reason)
        if Command.CHECKPOINT in actions or Command.CHECKPOINT_EXIT in actions:
            self.save(step)
        if Command.CHECKPOINT_EXIT in actions:
            self.leave(actions[Command.CHECKPOINT_EXIT] or "asked", step, 0 if self.mode == "exit_zero" else 75)

    def run(self) -> None:
        step = self.resume()
        self.busy(self.load_seconds, keepalive=self.mode != "silent_load")
        token = "not-the-token" if self.mode == "wrong_token" else os.environ["MLXSUP_TOKEN"]
        self.last_heard = time.time()
        self.send(Hello(token, os.getpid(), os.environ["MLXSUP_JOB"], step, self.args.steps, self.batch, self.accum))
        while self.mode == "waits_for_welcome" and not self.welcomed:
            self.read()
            time.sleep(0.01)
        last = time.perf_counter()
        first = self.mode == "steps_past_target"  # broken: always trains a step, even resumed at the target
        while step < self.args.steps or first:
            first = False
            time.sleep(self.args.step_ms / 1000)
            step += 1
            if self.slow_every and step % self.slow_every == 0:
                self.busy(self.slow_seconds, keepalive=self.mode != "no_keepalive")
            if self.mode == "mid_step_checkpoint":
                self.boundary(step)  # acts before the step is reported: the checkpoint is not at a boundary
            now = time.perf_counter()
            seconds = (now - last) * (1000 if self.mode == "ms_seconds" else 1)
            last = now
            rss = psutil.Process().memory_info().rss
            self.report(Step(step, self.batch, self.accum, 1.0 / step, seconds, 0, 0, 0, rss))
            self.stepped = True
            if self.mode != "mid_step_checkpoint":
                self.boundary(step)
        self.save(step)
        if self.mode != "no_finish_goodbye":
            self.send(Goodbye("finished", step))
        self.sock.close(linger=1000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--break", dest="mode", choices=MODES, default="")
    parser.add_argument("--future", action="store_true")
    parser.add_argument("--v1-only", action="store_true", help="play a 1.0 worker: read version 1 frames only")
    Worker(parser.parse_args()).run()


if __name__ == "__main__":
    main()
