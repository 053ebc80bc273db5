"""``tail``: the end of a job's stdout, stderr or telemetry; ``-f`` follows (the CLI polls or subscribes)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand, job_of

if TYPE_CHECKING:
    from pathlib import Path

    from supervisor.daemon.server import DaemonService

STREAMS = ("stdout", "stderr", "telemetry")
MAX_CHUNK = 64 * 1024


class Tail(ControlCommand):
    name = "tail"
    help = "end of a job's stdout, stderr or telemetry; -f to follow"
    role = Role.READ
    wire: ClassVar[dict[str, tuple[type, bool]]] = {
        "job": (str, True), "stream": (str, False), "offset": (int, False), "bytes": (int, False)}

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
        parser.add_argument("job")
        parser.add_argument("stream", nargs="?", default="stdout", choices=STREAMS)
        parser.add_argument("--bytes", type=int, default=4096, help="how much of the end to show first")
        parser.add_argument("--seconds", type=float, default=None, help="with -f: stop after this long")

    def to_wire(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"job": args.job, "stream": args.stream, "bytes": args.bytes}

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        stream = args.get("stream", "stdout")
        if stream not in STREAMS:  # names from the wire never become paths
            raise ControlError(ControlError.BAD_VALUE, f"stream {stream[:16]!r} is not one of {STREAMS}")
        path: Path | None
        if stream == "telemetry":
            path = job.paths.telemetry
        else:
            path = job.paths.logs / f"{stream}.log"
        return read_chunk(path, args.get("offset"), max(0, min(args.get("bytes", 4096), MAX_CHUNK)))

    def render(self, result: Any) -> str:
        return str(result["data"])


def read_chunk(path: Path | None, offset: int | None, tail_bytes: int) -> dict[str, Any]:
    """From ``offset`` (or the last ``tail_bytes``) up to MAX_CHUNK; returns the data and the next offset."""
    if path is None or not path.exists():
        return {"data": "", "offset": 0}
    size = path.stat().st_size
    start = max(0, size - tail_bytes) if offset is None else min(max(0, offset), size)
    if offset is not None and offset > size:
        start = 0  # the file was truncated or rotated: start over
    with open(path, "rb") as handle:
        handle.seek(start, os.SEEK_SET)
        data = handle.read(MAX_CHUNK)
    return {"data": data.decode(errors="replace"), "offset": start + len(data)}
