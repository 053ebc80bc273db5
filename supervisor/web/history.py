"""The whole-run view: a job's ``telemetry.jsonl`` read through the control socket's ``tail`` (so it works
against a remote daemon with a read key), in a bounded number of chunks spread evenly over the file, then
downsampled. Cost is bounded whatever the file's size: at most ``CHUNKS`` requests of 64 kB each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from supervisor.daemon.recorder import expand_steps

CHUNKS = 24
CHUNK_BYTES = 64 * 1024  # what one tail request returns at most
MAX_POINTS = 600

Call = Callable[[str, dict[str, Any]], Any]


def parse_chunk(data: str, first: bool) -> list[dict[str, Any]]:
    """The complete JSON records of a chunk: the first line is torn unless the chunk starts the file, the
    last unless it ends with a newline; damaged lines are skipped."""
    lines = data.split("\n")
    lines = lines[:-1]  # after the last newline: empty, or a torn line
    if not first and lines:
        lines = lines[1:]
    records: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        records.extend(expand_steps(record) if record.get("k") == "steps" else [record])
    return records


def downsample(points: list[list[Any]], limit: int = MAX_POINTS) -> list[list[Any]]:
    """At most ``limit`` points, keeping each bucket's largest footprint (a peak is what a person looks for)."""
    if len(points) <= limit:
        return points
    size = len(points) / limit
    out = []
    for i in range(limit):
        bucket = points[int(i * size):max(int((i + 1) * size), int(i * size) + 1)]
        out.append(max(bucket, key=lambda p: p[1] or 0))
    return out


def whole_run(call: Call, job: str) -> dict[str, Any]:
    """Points [t, sampled, active, cache, step] and restart markers of a job's recorded run."""
    size = int(call("tail", {"job": job, "stream": "telemetry", "bytes": 0})["offset"])
    stride = max(CHUNK_BYTES, size // CHUNKS)
    records: list[dict[str, Any]] = []
    for offset in range(0, size, stride):
        chunk = call("tail", {"job": job, "stream": "telemetry", "offset": offset})
        records += parse_chunk(str(chunk.get("data", "")), offset == 0)
    samples: list[list[Any]] = []
    active = cache = step = None
    for record in sorted((r for r in records if isinstance(r.get("t"), int | float)), key=lambda r: r["t"]):
        if record.get("k") == "step":
            active, cache, step = record.get("mlx_active"), record.get("mlx_cache"), record.get("step")
        elif record.get("k") == "sample" and isinstance(record.get("bytes"), int):
            samples.append([record["t"], record["bytes"], active, cache, step])
    events = call("history", {"job": job, "limit": 1000}).get("events", [])
    markers = [{"t": e.get("time"), "kind": "restart", "text": f"restart: {e.get('reason', '')}"}
               for e in events if e.get("event") == "restart" and isinstance(e.get("time"), int | float)]
    return {"job": job, "bytes": size, "chunks": len(range(0, size, stride)), "points": downsample(samples),
            "markers": markers[-200:]}
