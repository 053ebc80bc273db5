"""Messages exchanged between the daemon and a worker: one frozen dataclass per type.

A frame is one msgpack map: ``{"v": PROTOCOL_VERSION, "t": <type tag>, <field>: <value>, ...}``.
``decode`` checks the version, the tag, every field's presence and type, and the frame size, and raises
``ProtocolError`` naming the first thing that is wrong. Nothing here trusts its input.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Final, get_args, get_type_hints

import msgpack

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE_BYTES: Final = 64 * 1024

# Exit status of a worker that checkpointed because it was asked to (or lost its daemon) and wants a restart.
EXIT_CHECKPOINTED: Final = 75


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text names what is wrong."""


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """First message of a worker: proves the spawn with its token and says where it resumes."""

    TAG: ClassVar[str] = "hello"
    token: str
    pid: int
    job: str
    start_step: int
    target_steps: int
    batch: int
    accum: int


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """Telemetry sent by the worker after every optimizer step."""

    TAG: ClassVar[str] = "step"
    step: int
    batch: int
    accum: int
    loss: float
    step_seconds: float
    mlx_active: int
    mlx_cache: int
    mlx_peak: int
    footprint: int
    # Optional (absent from the frame when None): training throughput, and the validation loss of this step.
    tokens_per_second: float | None = None
    val_loss: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointSaved:
    """A checkpoint became durable (fsynced and renamed into place)."""

    TAG: ClassVar[str] = "checkpoint_saved"
    step: int
    path: str
    seconds: float
    nbytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class Goodbye:
    """Last message of a worker before it exits on its own terms."""

    TAG: ClassVar[str] = "goodbye"
    reason: str
    step: int


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness, both ways. ``sent_at`` is the sender's wall clock (same machine). A worker's heartbeat may
    carry its spawn token: before its hello (while it loads a model) that is how the daemon knows it is alive."""

    TAG: ClassVar[str] = "heartbeat"
    sent_at: float
    token: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """An instruction from the daemon, honoured by the worker at its next step boundary."""

    TAG: ClassVar[str] = "command"
    CLEAR_CACHE: ClassVar[str] = "clear_cache"
    CHECKPOINT: ClassVar[str] = "checkpoint"
    CHECKPOINT_EXIT: ClassVar[str] = "checkpoint_exit"
    ACTIONS: ClassVar[frozenset[str]] = frozenset({CLEAR_CACHE, CHECKPOINT, CHECKPOINT_EXIT})
    action: str
    reason: str


Message = Hello | Step | CheckpointSaved | Goodbye | Heartbeat | Command
_TYPES: Final[dict[str, type[Any]]] = {
    cls.TAG: cls for cls in (Hello, Step, CheckpointSaved, Goodbye, Heartbeat, Command)
}
_FIELDS: Final[dict[str, tuple[tuple[str, type[Any]], ...]]] = {
    tag: tuple((f.name, get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls))
    for tag, cls in _TYPES.items()
}
_MAX_STR: Final = 4096
# Fields that may be absent from a frame (and are left out when None): their defaults.
_OPTIONAL: Final[dict[str, dict[str, Any]]] = {
    cls.TAG: {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for cls in _TYPES.values()
}


_NAMES: Final[dict[str, tuple[str, ...]]] = {tag: tuple(n for n, _ in fields) for tag, fields in _FIELDS.items()}
_PACKER: Final = msgpack.Packer(use_bin_type=True)  # reused: encode runs once per training step


def encode(message: Message) -> bytes:
    """Serialize one message to a frame."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TAG}
    optional = _OPTIONAL[message.TAG]
    for name in _NAMES[message.TAG]:
        value = getattr(message, name)
        if value is not None or name not in optional:
            body[name] = value
    return _PACKER.pack(body)  # type: ignore[no-any-return]


def decode(frame: bytes) -> Message:
    """Parse and validate one frame; raise ProtocolError naming the problem."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the maximum of {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"frame is not valid msgpack: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"frame must be a map, got {type(body).__name__}")
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported (expected {PROTOCOL_VERSION})")
    tag = body.get("t")
    if not isinstance(tag, str) or tag not in _TYPES:
        raise ProtocolError(f"unknown message type {tag!r}")
    cls = _TYPES[tag]
    fields = _FIELDS[tag]
    extra = set(body) - {"v", "t"} - {name for name, _ in fields}
    if extra:
        raise ProtocolError(f"{tag}: unexpected field(s) {sorted(map(str, extra))}")
    values = {name: _check(tag, name, kind, body) for name, kind in fields}
    message: Message = cls(**values)
    if isinstance(message, Command) and message.action not in Command.ACTIONS:
        raise ProtocolError(f"command: unknown action {message.action!r}")
    return message


def _check(tag: str, name: str, kind: Any, body: dict[str, Any]) -> Any:
    optional = _OPTIONAL[tag]
    if name not in body:
        if name in optional:
            return optional[name]
        raise ProtocolError(f"{tag}: missing field {name!r}")
    value = body[name]
    if name in optional and optional[name] is None:
        if value is None:
            return None
        kind = next(k for k in get_args(kind) if k is not type(None))  # X | None: check as X
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{tag}.{name}: expected an integer, got {type(value).__name__}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{tag}.{name}: expected a number, got {type(value).__name__}")
        value = float(value)
        if math.isinf(value):
            raise ProtocolError(f"{tag}.{name}: infinite value")
        return value  # NaN is legal: a diverged loss is worth reporting
    if kind is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{tag}.{name}: expected a string, got {type(value).__name__}")
        if len(value) > _MAX_STR:
            raise ProtocolError(f"{tag}.{name}: string of {len(value)} chars exceeds {_MAX_STR}")
        return value
    raise ProtocolError(f"{tag}.{name}: unsupported field type {kind!r}")  # pragma: no cover
