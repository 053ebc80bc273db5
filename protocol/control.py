"""Control-plane frames: requests from mlxsupctl, replies from mlxsupd, and published events.

Request: ``{"v": 1, "id": str, "cmd": str, "args": {...}}``. Reply: ``{"v": 1, "id": <echo>, "ok": true,
"result": ...}`` or ``{"v": 1, "id": <echo>, "ok": false, "error": {"code": str, "message": str}}``.
Events go out on PUB with the topic frame ``job.<name>.<kind>`` and a msgpack map as payload.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import msgpack

from protocol.messages import ProtocolError

CONTROL_VERSION: Final = 1
MAX_CONTROL_BYTES: Final = 256 * 1024
MAX_ID_CHARS: Final = 64
EVENT_KINDS: Final = ("telemetry", "state", "decision", "log")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    id: str
    cmd: str
    args: dict[str, Any]


class ControlError(Exception):
    """A request that cannot be done; ``code`` is stable for scripts, the message names the problem."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_COMMAND = "unknown_command"
    NO_SUCH_JOB = "no_such_job"
    BAD_STATE = "bad_state"
    BAD_VALUE = "bad_value"
    FORBIDDEN = "forbidden"  # the client's role does not allow the command (the message names the role that does)
    INTERNAL = "internal"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RequestError(ProtocolError):
    """A malformed request; ``request_id`` is the id when it could still be read, so the reply can echo it."""

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


def _unpack(frame: bytes) -> Any:
    if len(frame) > MAX_CONTROL_BYTES:
        raise RequestError(f"frame of {len(frame)} bytes exceeds the maximum of {MAX_CONTROL_BYTES}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise RequestError(f"frame is not valid msgpack: {exc.__class__.__name__}") from None


def encode_request(request: Request) -> bytes:
    body = {"v": CONTROL_VERSION, "id": request.id, "cmd": request.cmd, "args": request.args}
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_request(frame: bytes) -> Request:
    """Parse a request envelope (the command's own arguments are checked by the command registry)."""
    body = _unpack(frame)
    if not isinstance(body, dict):
        raise RequestError(f"request must be a map, got {type(body).__name__}")
    raw_id = body.get("id", "")
    request_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_CHARS else ""
    if not isinstance(raw_id, str) or len(raw_id) > MAX_ID_CHARS:
        raise RequestError(f"request id must be a string of at most {MAX_ID_CHARS} chars")
    if body.get("v") != CONTROL_VERSION:
        raise RequestError(f"control protocol version {body.get('v')!r} is not supported", request_id)
    cmd, args = body.get("cmd"), body.get("args", {})
    if not isinstance(cmd, str) or not cmd or len(cmd) > 32:
        raise RequestError("request 'cmd' must be a non-empty string of at most 32 chars", request_id)
    if not isinstance(args, dict):
        raise RequestError(f"request 'args' must be a map, got {type(args).__name__}", request_id)
    extra = set(body) - {"v", "id", "cmd", "args"}
    if extra:
        raise RequestError(f"unexpected request field(s) {sorted(map(str, extra))}", request_id)
    return Request(request_id, cmd, args)


def encode_reply(request_id: str, result: Any = None, error: tuple[str, str] | None = None) -> bytes:
    body: dict[str, Any] = {"v": CONTROL_VERSION, "id": request_id, "ok": error is None}
    if error is None:
        body["result"] = result
    else:
        body["error"] = {"code": error[0], "message": error[1]}
    return msgpack.packb(body, use_bin_type=True, default=str)  # type: ignore[no-any-return]


def decode_reply(frame: bytes) -> dict[str, Any]:
    body = _unpack(frame)
    if not isinstance(body, dict) or body.get("v") != CONTROL_VERSION or "ok" not in body:
        raise ProtocolError("reply is not a control-protocol reply")
    return body


def event_topic(job: str, kind: str) -> bytes:
    return f"job.{job}.{kind}".encode()


def encode_event(data: dict[str, Any]) -> bytes:
    return msgpack.packb(data, use_bin_type=True, default=str)  # type: ignore[no-any-return]


def decode_event(frame: bytes) -> dict[str, Any]:
    body = _unpack(frame)
    if not isinstance(body, dict):
        raise ProtocolError("event payload must be a map")
    return body
