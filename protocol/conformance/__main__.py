"""``python -m protocol.conformance [OPTIONS] -- CMD [ARGS...]``: check a worker against docs/PROTOCOL.md."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from protocol.conformance import CHECKS, Options, Result, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protocol.conformance",
        description="Run a worker under a scripted supervisor and check each rule of the worker protocol "
                    "(docs/PROTOCOL.md; its section 9 lists the checks and the MLXSUP_CONFORMANCE_* variables that "
                    "ask for a slow load or a long step). Exit status 0 only when every check passes. The worker "
                    "must train long enough for the checks (a few thousand steps), and reach its target within "
                    "--finish-timeout.",
        epilog="checks: " + ", ".join(CHECKS),
    )
    arg = parser.add_argument
    arg("--json", action="store_true", help="print the result as JSON instead of a table")
    arg("--name", default="", help="name of the worker in the report (default: the command's file name)")
    arg("--results", default="", help="also add the result to this JSON file ({\"workers\": [...]}), "
                                      "replacing an entry of the same name")
    arg("--only", default="", help="comma-separated checks to run (default: all)")
    arg("--timeout", type=float, default=30.0, help="longest wait for any expected frame, s (default: %(default)s)")
    arg("--orphan-timeout", type=float, default=1.5, help="MLXSUP_ORPHAN_TIMEOUT given to the worker, s "
                                                          "(default: %(default)s)")
    arg("--kill-grace", type=float, default=3.0, help="SIGTERM to exit 75 must take less, s (default: %(default)s)")
    arg("--finish-timeout", type=float, default=120.0, help="the last life must reach its target within this, s "
                                                            "(default: %(default)s)")
    arg("--keep-files", action="store_true", help="keep the private directory (worker logs, checkpoints)")
    arg("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]: the worker to check")
    return parser


def report(name: str, command: list[str], results: list[Result]) -> dict[str, Any]:
    passed = sum(r.ok for r in results)
    return {"name": name, "command": shlex.join(command), "passed": passed, "failed": len(results) - passed,
            "checks": [{"check": r.check, "ok": r.ok, "detail": r.detail} for r in results]}


def table(entry: dict[str, Any]) -> str:
    width = max(len(c["check"]) for c in entry["checks"]) if entry["checks"] else 5
    lines = [f"conformance of {entry['name']}: {entry['command']}", f"{'CHECK':<{width}}  RESULT  DETAIL"]
    for check in entry["checks"]:
        lines.append(f"{check['check']:<{width}}  {'PASS' if check['ok'] else 'FAIL':<6}  {check['detail']}")
    lines.append(f"{entry['passed']} passed, {entry['failed']} failed")
    return "\n".join(lines)


def merge(path: Path, entry: dict[str, Any]) -> None:
    """Put ``entry`` into the results file, replacing the worker of the same name."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        workers = [w for w in data["workers"] if w.get("name") != entry["name"]]
    except (OSError, ValueError, KeyError, TypeError):
        workers = []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"workers": [*workers, entry]}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no worker command: give it after --, e.g. -- python examples/sdk_loop.py")
    only = [name for name in args.only.split(",") if name]
    if unknown := sorted(set(only) - set(CHECKS)):
        parser.error(f"unknown check(s) {unknown}; known: {', '.join(CHECKS)}")
    options = Options(timeout=args.timeout, orphan_timeout=args.orphan_timeout, kill_grace=args.kill_grace,
                      finish_timeout=args.finish_timeout, keep_files=args.keep_files)
    try:
        results = run(command, options, only)
    except OSError as exc:
        print(f"conformance: cannot run {shlex.join(command)}: {exc}", file=sys.stderr)
        return 2
    entry = report(args.name or Path(command[0]).name, command, results)
    if args.results:
        merge(Path(args.results), entry)
    print(json.dumps(entry, indent=1) if args.json else table(entry))
    return 0 if entry["failed"] == 0 and results else 1


if __name__ == "__main__":
    sys.exit(main())
