"""The interactive parts of mlxsupctl: tail -f, top, the shell, keygen and plot."""

from __future__ import annotations

import argparse
import cmd
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from supervisor.control.client import ControlClient, UsageError
from supervisor.control.commands import CLI_COMMANDS, ControlError
from supervisor.control.commands.jobs import rank_line
from supervisor.core.sizes import format_bytes

BAR = 20


def follow(client: ControlClient, events: str, wire: dict[str, Any], as_json: bool,
           seconds: float | None = None) -> int:
    """Print a job's output as it grows (stdout/stderr by polling, telemetry from the event stream)."""
    end = time.monotonic() + seconds if seconds else float("inf")
    if wire.get("stream") == "telemetry":
        topic = f"job.{wire['job']}.telemetry"
        client.call("status", {"job": wire["job"]})  # fails fast, naming the job, when it does not exist
        for _, event in client.subscribe(events, [topic], timeout=None if seconds is None else seconds):
            print(json.dumps(event, default=str), flush=True)
            if time.monotonic() >= end:
                break
        return 0
    offset = None
    while time.monotonic() < end:
        args = {**wire, **({"offset": offset} if offset is not None else {})}
        result = client.call("tail", args)
        if result["data"]:
            sys.stdout.write(result["data"])
            sys.stdout.flush()
        offset = result["offset"]
        time.sleep(0.5)
    return 0


def bar(used: int, budget: int) -> str:
    filled = min(BAR, int(BAR * used / budget)) if budget else 0
    return "[" + "#" * filled + "." * (BAR - filled) + "]"


def top_frame(jobs: list[dict[str, Any]], decisions: dict[str, str]) -> str:
    header = (f"{'JOB':<14} {'STATE':<18} {'STEP':>13} {'STEP/S':>7} {'MEMORY':>21} {'':<22} "
              f"{'LEAK MB/STEP':>12} {'RESTARTS':>8} {'BATCH':>7}")
    lines = [header]
    for row in jobs:
        guard = row.get("guard_only")  # no steps or batch: its growth per second in the leak column
        step = "guard-only" if guard else f"{row['step']}/{row['target_steps'] or '?'}"
        rate = "-" if guard else f"{row['steps_per_second']:.2f}"
        leak = (f"{row['guard']['growth_bytes_per_second'] / 2**20:.1f}/s" if guard
                else f"{row['leak_bytes_per_step'] / 2**20:.1f}")
        batch = "-" if guard else f"{row['batch']}x{row['accum']}"
        mem = f"{format_bytes(row['sampled_bytes'])}/{format_bytes(row['budget_bytes'])}"
        lines.append(
            f"{row['name'][:14]:<14} {row['state']:<18} {step:>13} {rate:>7} {mem:>21} "
            f"{bar(row['sampled_bytes'], row['budget_bytes']):<22} {leak:>12} "
            f"{row['restarts']:>8} {batch:>7}")
        if row["name"] in decisions:
            lines.append(f"{'':<14} last decision: {decisions[row['name']][:100]}")
        lines += [rank_line(rank) for rank in row.get("ranks", [])]
    return "\n".join(lines)


def top(client: ControlClient, events: str, once: bool, seconds: float | None) -> int:
    """A live table, redrawn in place twice a second; decisions arrive from the event stream."""
    import zmq

    decisions: dict[str, str] = {}
    # Without an event endpoint (-s tcp://... and no --events) the table still works, only without decisions.
    sub = client.subscriber(events, ["job."]) if events else client.new_socket(zmq.SUB)
    end = time.monotonic() + seconds if seconds else float("inf")
    tty = sys.stdout.isatty()
    try:
        while True:
            while sub.poll(0):
                topic, payload = sub.recv_multipart()
                if topic.endswith(b".decision"):
                    from protocol.control import decode_event

                    decisions[topic.decode().split(".")[1]] = str(decode_event(payload).get("reason", ""))
            frame = top_frame(client.call("status")["jobs"], decisions)
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + frame + "\n")
            sys.stdout.flush()
            if once or time.monotonic() >= end:
                return 0
            time.sleep(0.5)
    finally:
        sub.close(linger=0)


class Shell(cmd.Cmd):
    """supervisorctl-style shell: every registry command, with tab completion of commands and jobs."""

    prompt = "mlxsup> "

    def __init__(self, client: ControlClient, args: argparse.Namespace, events: str = "") -> None:
        super().__init__()
        self.client = client
        self.args = args
        self.events = events
        self.jobs: list[str] = []
        self.intro = "mlxsupctl shell: 'help' lists commands, 'quit' leaves."

    def default(self, line: str) -> bool:  # type: ignore[override]
        from supervisor.cli.mlxsupctl import build_parser, run_command

        try:
            words = shlex.split(line)
            args = build_parser().parse_args([*self._globals(), *words])
        except (ValueError, SystemExit):
            return False
        if args.command not in CLI_COMMANDS:
            print(f"*** {words[0] if words else line}: not available in the shell")
            return False
        try:
            run_command(args, self.client, self.events)
        except ControlError as exc:
            print(f"*** {exc.code}: {exc.message}")
        except UsageError as exc:
            print(f"*** {exc}")
        except KeyboardInterrupt:  # ends a `tail -f`, not the session
            print()
        return False

    def _globals(self) -> list[str]:
        return ["--json"] if self.args.json else []

    def do_help(self, arg: str) -> None:
        for name, command in sorted(CLI_COMMANDS.items()):
            print(f"{name:<12} {command.help}")
        print(f"{'quit':<12} leave the shell")

    def do_quit(self, arg: str) -> bool:
        return True

    do_exit = do_quit
    do_EOF = do_quit

    def emptyline(self) -> bool:
        return False

    def completenames(self, text: str, *ignored: Any) -> list[str]:
        return [n for n in [*CLI_COMMANDS, "quit"] if n.startswith(text)]

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        if not self.jobs:
            try:
                self.jobs = [j["name"] for j in self.client.call("status")["jobs"]]
            except ControlError:
                return []
        return [j for j in self.jobs if j.startswith(text)]


def shell(client: ControlClient, args: argparse.Namespace, events: str = "") -> int:
    """The interactive shell, with history kept in ~/.mlxsupctl_history when readline is available."""
    history: Path | None = Path(os.path.expanduser("~/.mlxsupctl_history"))
    try:
        import readline

        if history is not None and history.exists():
            readline.read_history_file(history)
        readline.set_history_length(1000)
    except (ImportError, OSError):
        history = None
    try:
        Shell(client, args, events).cmdloop()
    finally:
        if history is not None:
            try:
                import readline

                readline.write_history_file(history)
            except (ImportError, OSError):
                pass
    return 0


def keygen(name: str, directory: Path) -> int:
    """Write NAME.key (public) and NAME.key_secret (secret, 0600) for CURVE."""
    import zmq.auth

    if not name.replace("-", "").replace("_", "").isalnum():
        print(f"mlxsupctl: key name {name!r} must use letters, digits, '-' and '_'", file=sys.stderr)
        return 2
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    key, _ = zmq.auth.load_certificate(public)
    print(f"public key file: {public}\nsecret key file: {secret}\npublic key: {key.decode()}")
    return 0


def plot(args: argparse.Namespace) -> int:
    """Plot a job's recorded memory (from the config's state dir; works without a running daemon)."""
    from supervisor import paths
    from supervisor.config import load_config
    from supervisor.tools.plot import plot_job

    config = load_config(args.config or paths.default_config_path())
    if args.job not in config.jobs:
        print(f"mlxsupctl: no job {args.job!r} in {config.path}", file=sys.stderr)
        return 2
    from supervisor.daemon.footprint import system_memory

    limits = config.jobs[args.job].limits(system_memory()[1])
    out = args.output or Path(f"{args.job}-memory.png")
    plot_job(config.job_dir(args.job), out, {"warn": limits.warn, "budget": limits.budget, "kill": limits.kill})
    print(out)
    return 0
