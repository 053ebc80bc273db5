"""What the dashboard knows: the last status, a bounded ring of recent memory points per job, the worker
exits and restarts, and the recent decisions. Fed by one thread (status polls and the event stream), read by
the HTTP threads under one lock; everything is bounded.

Times are the dashboard's wall clock (seconds since the epoch): the page and this process share a machine,
whatever host the daemon is on.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Any

LIVE_SECONDS = 600.0  # the live window: about the last ten minutes
MAX_POINTS = 2400  # per job, whatever the interval
MAX_MARKERS = 200  # exits and restarts per job
MAX_DECISIONS = 20  # per job
MAX_JOBS = 256  # a config with more jobs than this is shown in part
EXIT_STATES = frozenset({"BACKOFF", "FATAL", "FINISHED", "STOPPED", "WAITING_FOR_MEMORY"})

Point = list[float | int | None]  # [t, sampled footprint, MLX active, MLX cache, step]


def split_topic(topic: str) -> tuple[str, str] | None:
    """(job, kind) of ``job.<name>.<kind>`` (a job name may hold dots), else None."""
    if not topic.startswith("job.") or topic.count(".") < 2:
        return None
    job, _, kind = topic[4:].rpartition(".")
    return (job, kind) if job else None


class Model:
    """The dashboard's state. ``on_status`` and ``on_event`` return what to push to the pages (or None)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.lock = threading.Lock()
        self.maxlen = max(10, min(MAX_POINTS, math.ceil(LIVE_SECONDS / max(interval, 0.05))))
        self.status: dict[str, Any] | None = None
        self.error = ""
        self.rings: dict[str, collections.deque[Point]] = {}
        self.markers: dict[str, collections.deque[dict[str, Any]]] = {}
        self.decisions: dict[str, collections.deque[dict[str, Any]]] = {}
        self.mlx: dict[tuple[str, int], dict[str, Any]] = {}  # (job, rank) -> last step telemetry
        self.restarts: dict[str, int] = {}  # job -> restarts count at the last status
        self.marked: dict[str, int] = {}  # job -> restart markers added since that status

    def _known(self, job: str) -> bool:
        return job in self.rings or len(self.rings) < MAX_JOBS

    def _job(self, job: str) -> None:
        if job not in self.rings:
            self.rings[job] = collections.deque(maxlen=self.maxlen)
            self.markers[job] = collections.deque(maxlen=MAX_MARKERS)
            self.decisions[job] = collections.deque(maxlen=MAX_DECISIONS)

    def on_status(self, status: dict[str, Any], now: float) -> dict[str, Any]:
        """A status reply: one point per job; a restart the events did not show becomes a marker anyway."""
        points: dict[str, Point] = {}
        markers: dict[str, dict[str, Any]] = {}
        with self.lock:
            self.status, self.error = status, ""
            for row in status.get("jobs", [])[:MAX_JOBS]:
                name = str(row.get("name", ""))
                self._job(name)
                mlx = self.mlx.get((name, 0), {})
                point: Point = [round(now, 3), row.get("sampled_bytes") or None, mlx.get("mlx_active"),
                                mlx.get("mlx_cache"), row.get("step")]
                self.rings[name].append(point)
                points[name] = point
                restarts = int(row.get("restarts") or 0)
                before = self.restarts.get(name)
                if before is not None and restarts > before + self.marked.get(name, 0):
                    marker = {"t": round(now, 3), "kind": "restart", "text": "restart (seen in status)"}
                    self.markers[name].append(marker)
                    markers[name] = marker
                self.restarts[name], self.marked[name] = restarts, 0
        return {"t": round(now, 3), "status": status, "points": points, "markers": markers}

    def on_error(self, message: str) -> dict[str, Any]:
        with self.lock:
            self.error = message
        return {"error": message}

    def on_event(self, topic: str, event: dict[str, Any], now: float) -> dict[str, Any] | None:
        """One event of the daemon's stream: telemetry is kept (the next point carries it), a decision or a
        state change is pushed at once."""
        parsed = split_topic(topic)
        if parsed is None:
            return None
        job, kind = parsed
        with self.lock:
            if not self._known(job):
                return None
            self._job(job)
            if kind == "telemetry":
                rank = event.get("rank", 0)
                self.mlx[(job, rank if isinstance(rank, int) else 0)] = event
                return None
            if kind == "decision":
                entry = {"t": round(now, 3), "action": str(event.get("action", "")),
                         "reason": str(event.get("reason", "")), "diagnosis": str(event.get("diagnosis", ""))}
                self.decisions[job].append(entry)
                return {"job": job, "kind": kind, "decision": entry}
            if kind == "state":
                marker = self._state_marker(job, event, now)
                return {"job": job, "kind": kind, "state": str(event.get("new", "")),
                        "reason": str(event.get("reason", "")), "marker": marker}
            if kind == "log":
                return {"job": job, "kind": kind, "text": str(event.get("event", ""))[:200],
                        "step": event.get("step")}
        return None

    def _state_marker(self, job: str, event: dict[str, Any], now: float) -> dict[str, Any] | None:
        new, old, reason = str(event.get("new", "")), str(event.get("old", "")), str(event.get("reason", ""))
        if new == "STARTING" and reason.startswith("restart"):
            marker = {"t": round(now, 3), "kind": "restart", "text": reason[:200]}
            self.marked[job] = self.marked.get(job, 0) + 1
        elif new in EXIT_STATES and old not in EXIT_STATES:
            marker = {"t": round(now, 3), "kind": "exit", "text": f"{new}: {reason}"[:200]}
        else:
            return None
        self.markers[job].append(marker)
        return marker

    def snapshot(self) -> dict[str, Any]:
        """Everything a page needs when it (re)connects."""
        with self.lock:
            return {"status": self.status, "error": self.error, "live_seconds": LIVE_SECONDS,
                    "rings": {job: list(ring) for job, ring in self.rings.items()},
                    "markers": {job: list(m) for job, m in self.markers.items()},
                    "decisions": {job: list(d) for job, d in self.decisions.items()}}

    def metrics_view(self) -> tuple[dict[str, Any] | None, dict[tuple[str, int], dict[str, Any]]]:
        """The last status and the last step telemetry per (job, rank), for /metrics."""
        with self.lock:
            return self.status, dict(self.mlx)
