"""``python -m tests.faults [--quick]``: run the fault campaign, print the table, write the JSON summary.

Exit status 0 when every fault that ran was survived every time (nothing lost, nothing orphaned, final weights
bit-identical, daemon alive after fuzzing), 1 otherwise, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tests.faults import access, daemon_kills, disk_faults, fuzz, process_faults, report, security, soak, worker_kills
from tests.faults.common import FaultResult, Workspace, reap_all, set_subreaper
from tests.faults.soak import SoakPlan


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of each fault; the time budgets bound the two long loops."""

    worker_kills: int
    worker_budget: float
    daemon_kills: int
    daemon_budget: float
    stops: int
    damage_rounds: int
    fuzz_frames: int  # raw frames per socket
    hypothesis_examples: int
    soak: SoakPlan


FULL = Plan(worker_kills=200, worker_budget=480, daemon_kills=20, daemon_budget=180, stops=3, damage_rounds=2,
            fuzz_frames=100_000, hypothesis_examples=1000, soak=SoakPlan())
QUICK = Plan(worker_kills=15, worker_budget=40, daemon_kills=3, daemon_budget=30, stops=1, damage_rounds=1,
             fuzz_frames=2_500, hypothesis_examples=100,
             soak=SoakPlan(restarts=0))


def steps(plan: Plan, seed: int) -> list[tuple[str, Callable[[Workspace], FaultResult | list[FaultResult]]]]:
    return [
        ("worker-kill", lambda ws: worker_kills.run(ws, plan.worker_kills, seed, plan.worker_budget)),
        ("daemon-kill", lambda ws: daemon_kills.run(ws, plan.daemon_kills, seed, plan.daemon_budget)),
        ("daemon-kill-mid-step", daemon_kills.mid_step),
        ("hang", lambda ws: process_faults.hang(ws, plan.stops)),
        ("disk-full", disk_faults.disk_full),
        ("damaged", lambda ws: disk_faults.damaged(ws, plan.damage_rounds)),
        ("pid-reuse", lambda ws: process_faults.pid_reuse()),
        ("fuzz", lambda ws: fuzz.run(ws, plan.fuzz_frames, plan.hypothesis_examples, seed)),
        ("security", security.run),
        ("access", access.run),
        ("second-daemon", security.second_daemon),
        ("soak", lambda ws: soak.run(ws, plan.soak)),
    ]


def run_campaign(plan: Plan, seed: int, only: set[str], keep: bool) -> list[FaultResult]:
    """Every selected fault in turn; a fault that raises becomes a failed row and the campaign goes on."""
    results: list[FaultResult] = []
    workspace = Workspace(keep=keep)
    try:
        for name, step in steps(plan, seed):
            if only and name not in only:
                continue
            started = time.monotonic()
            print(f"[faults] {name} ...", file=sys.stderr, flush=True)
            try:
                outcome = step(workspace)
                results.extend(outcome if isinstance(outcome, list) else [outcome])
            except Exception as exc:  # a broken fault must not hide the others' results
                failed = FaultResult(name)
                failed.note(f"campaign error: {exc.__class__.__name__}: {exc}")
                traceback.print_exc()
                results.append(failed)
            finally:
                reap_all()
            print(f"[faults] {name} done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
    finally:
        workspace.close()
        if keep:
            print(f"[faults] workspace kept at {workspace.root}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version (about a minute)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(".faults/summary.json"), help="JSON summary path")
    parser.add_argument("--only", action="append", default=[], help="run only this fault (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace under /tmp for inspection")
    parser.add_argument("--soak-restarts", type=int, default=0,
                        help="restarts the soak runs to (default: 20000; --quick skips the soak unless given)")
    parser.add_argument("--soak-seconds", type=float, default=0.0,
                        help="stop the soak after this long, with its end figures (default: 4 hours)")
    args = parser.parse_args(argv)
    if not set_subreaper():
        print("[faults] not a subreaper: orphaned workers' exit codes are not observed", file=sys.stderr)
    plan = QUICK if args.quick else FULL
    if args.soak_restarts < 0:
        parser.error("--soak-restarts must be >= 0")
    if args.soak_seconds < 0:
        parser.error("--soak-seconds must be >= 0")
    if args.soak_restarts:
        plan = dataclasses.replace(plan, soak=dataclasses.replace(plan.soak, restarts=args.soak_restarts))
    if args.soak_seconds:
        plan = dataclasses.replace(plan, soak=dataclasses.replace(plan.soak, budget_seconds=args.soak_seconds))
    # Each soak figure lands in the summary as it is taken: a soak stopped early still leaves its figures.
    plan = dataclasses.replace(plan, soak=dataclasses.replace(plan.soak, progress=args.out))
    started = time.monotonic()
    results = run_campaign(plan, args.seed, set(args.only), args.keep)
    document = report.summary(results, time.monotonic() - started, "quick" if args.quick else "full")
    report.write(document, args.out)
    print(report.table(results))
    print(f"\nfuzz frames {document['fuzz_frames']}, daemon alive {document['daemon_alive']}, final weights equal "
          f"{document['final_weights_equal']}, {document['seconds']}s; summary in {args.out}")
    return 0 if document["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
