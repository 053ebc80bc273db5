"""The campaign's table and its JSON summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.faults.common import FaultResult

HEADERS = ("fault", "count", "survived", "ckpts lost", "orphans", "notes")


def skipped(result: FaultResult) -> bool:
    return result.count == 0 and any(n.startswith("skipped") for n in result.notes)


def table(results: list[FaultResult]) -> str:
    """A plain-text table; notes are printed in full."""
    rows = [(r.fault, str(r.count), f"{r.survived}/{r.count}" if not skipped(r) else "skipped",
             str(r.checkpoints_lost), str(r.orphans), "; ".join(r.notes)) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADERS[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS[:-1], widths, strict=True)) + "  notes"]
    lines.append("  ".join("-" * w for w in widths) + "  -----")
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(lines)


def summary(results: list[FaultResult], seconds: float, mode: str) -> dict[str, Any]:
    """The JSON document written to .faults/summary.json."""
    extra: dict[str, Any] = {}
    for result in results:
        extra.update(result.extra)
    return {
        "faults": [r.as_json() for r in results],
        "fuzz_frames": int(extra.get("fuzz_frames", 0)),
        "daemon_alive": bool(extra.get("daemon_alive", False)),
        "final_weights_equal": bool(extra.get("final_weights_equal", False)),
        "rss_before": extra.get("rss_before"),
        "rss_after": extra.get("rss_after"),
        "revocation_seconds": extra.get("revocation_seconds"),
        "audit_records": extra.get("audit_records"),
        "soak": extra.get("soak"),
        "mode": mode,
        "seconds": round(seconds, 1),
        "passed": passed(results, extra),
    }


def passed(results: list[FaultResult], extra: dict[str, Any]) -> bool:
    """Every fault that ran survived every time, with nothing lost or left over, weights equal, daemon up."""
    ran = [r for r in results if not skipped(r)]
    faults = {r.fault for r in ran}  # a campaign of some faults only (--only) is judged on the figures they give
    return (all(r.ok() for r in ran) and ("protocol fuzzing" not in faults or bool(extra.get("daemon_alive")))
            and ("worker SIGKILL" not in faults or bool(extra.get("final_weights_equal"))))


def write(document: dict[str, Any], path: Path) -> None:
    """Write atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
