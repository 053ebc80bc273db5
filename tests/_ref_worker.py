"""A worker written from docs/PROTOCOL.md alone (no SDK, no MLX), with switches that break one rule each.

``python tests/_ref_worker.py --steps N [--step-ms MS] [--break MODE] [--future]``. With no ``--break`` it
follows the spec, so the conformance kit must pass it; each MODE breaks the rule one check is about, so that
check must FAIL. ``--future`` plays a newer worker: hello offers protocol 3 and every frame carries extra fields.
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

from protocol.checkpoints import CheckpointDamaged, checkpoint_name, hash_file, list_checkpoints, step_of, verify
from protocol.messages import CheckpointSaved, Command, Goodbye, Heartbeat, Hello, ProtocolError, Step, Welcome, decode

MODES = ("wrong_token", "ms_seconds", "mid_step_checkpoint", "bad_hash", "acts_on_invalid", "crash_on_garbage",
         "strict_fields", "exit_zero", "fresh_start", "deaf", "no_sigterm", "keep_all", "no_finish_goodbye",
         "reads_parts", "steps_past_target")


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.mode, env = args, args.mode, os.environ
        self.dir = Path(env["MLXSUP_CHECKPOINT_DIR"])
        self.batch, self.accum = int(env.get("MLXSUP_BATCH") or 4), int(env.get("MLXSUP_ACCUM") or 1)
        self.keep = int(env.get("MLXSUP_KEEP_CHECKPOINTS") or 3)
        self.orphan_timeout = float(env.get("MLXSUP_ORPHAN_TIMEOUT") or 5)
        self.parent, self.last_heard, self.stop_reason = os.getppid(), time.time(), ""
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.connect(env["MLXSUP_ENDPOINT"])
        if self.mode != "no_sigterm":
            signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stop_reason", "sigterm"))

    def send(self, message: Any) -> None:
        body = {"v": 1, "t": message.TAG, **{k: v for k, v in dataclasses.asdict(message).items() if v is not None}}
        if self.args.future:
            body.update({"protocol": 3} if body["t"] == "hello" else {}, gpu_watts=12.5, notes=["from v3"])
        self.sock.send(msgpack.packb(body, use_bin_type=True))

    def resume(self) -> int:
        for path in reversed(list_checkpoints(self.dir)):
            try:
                verify(path)
            except CheckpointDamaged:
                continue
            return 0 if self.mode == "fresh_start" else step_of(path)
        return 0

    def commands(self) -> list[Command]:
        found = []
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
                    found.append(Command(str(body["action"]), str(body.get("reason", ""))))
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
                print(f"welcome protocol={message.protocol}", flush=True)
            if isinstance(message, Command):
                found.append(message)
        if self.mode != "deaf" and os.getppid() != self.parent:
            self.stop_reason = "daemon_lost"
        elif self.mode != "deaf" and time.time() - self.last_heard > self.orphan_timeout:
            self.stop_reason = "daemon_silent"
        return found

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
        for old in list_checkpoints(self.dir)[: -self.keep] if self.mode != "keep_all" else []:
            shutil.rmtree(old, ignore_errors=True)
        nbytes = sum(p.stat().st_size for p in final.iterdir())
        self.send(CheckpointSaved(step, str(final), time.time() - started, nbytes))

    def leave(self, reason: str, step: int, code: int) -> None:
        self.send(Goodbye(reason, step))
        self.sock.close(linger=0 if reason.startswith("daemon_") else 1000)
        sys.exit(code)

    def boundary(self, step: int) -> None:
        actions = {c.action: c.reason for c in self.commands()}
        if self.stop_reason:
            actions[Command.CHECKPOINT_EXIT] = self.stop_reason
        if Command.CHECKPOINT in actions or Command.CHECKPOINT_EXIT in actions:
            self.save(step)
        if Command.CHECKPOINT_EXIT in actions:
            self.leave(actions[Command.CHECKPOINT_EXIT] or "asked", step, 0 if self.mode == "exit_zero" else 75)

    def run(self) -> None:
        step = self.resume()
        token = "not-the-token" if self.mode == "wrong_token" else os.environ["MLXSUP_TOKEN"]
        self.send(Hello(token, os.getpid(), os.environ["MLXSUP_JOB"], step, self.args.steps, self.batch, self.accum))
        last = time.perf_counter()
        first = self.mode == "steps_past_target"  # broken: always trains a step, even resumed at the target
        while step < self.args.steps or first:
            first = False
            time.sleep(self.args.step_ms / 1000)
            step += 1
            if self.mode == "mid_step_checkpoint":
                self.boundary(step)  # acts before the step is reported: the checkpoint is not at a boundary
            now = time.perf_counter()
            seconds = (now - last) * (1000 if self.mode == "ms_seconds" else 1)
            last = now
            rss = psutil.Process().memory_info().rss
            self.send(Step(step, self.batch, self.accum, 1.0 / step, seconds, 0, 0, 0, rss))
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
