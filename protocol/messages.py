"""Messages exchanged between the daemon and a worker: one frozen dataclass per type (spec: docs/PROTOCOL.md).

A frame is one msgpack map: ``{"v": <version>, "t": <type tag>, <field>: <value>, ...}``. ``decode`` checks the
version, the tag, every known field's presence and type, and the frame size, and raises ``ProtocolError``
naming the first thing that is wrong. Nothing here trusts its input.

Versioning: a worker's hello carries the newest version it speaks (``protocol``) and the daemon answers with a
``welcome`` naming the version both use from then on. Fields a receiver does not know are ignored, so a newer
peer may add optional fields; a message type it does not know is refused (``ProtocolError``). Optional fields
have defaults and are left out of a frame when they hold their default, so frames stay what version 1 sent.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
from collections.abc import Sequence
from typing import Any, ClassVar, Final, Union, get_args, get_origin, get_type_hints

import msgpack

PROTOCOL_VERSION: Final = 2  # the newest version this side speaks (docs/PROTOCOL.md 1.1: see section 4)
MIN_PROTOCOL_VERSION: Final = 1  # the oldest version this side still reads
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_STRING_CHARS: Final = 4096
MAX_INT: Final = 2**63 - 1  # integers are non-negative and fit a signed 64-bit integer in every language

# Exit status of a worker that checkpointed because it was asked to (or lost its daemon) and wants a restart.
EXIT_CHECKPOINTED: Final = 75
# Goodbye reason of a worker whose training is complete (it then exits 0).
FINISHED: Final = "finished"


class ProtocolError(ValueError):
    """A frame that is not a valid message; the text names what is wrong, ``kind`` classifies it.

    Kinds (shared with other SDKs through the test vectors): ``too_large``, ``not_msgpack``, ``not_a_map``,
    ``version``, ``unknown_type``, ``missing_field``, ``field_type``, ``field_value``, ``multipart``;
    ``invalid`` otherwise.
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


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
    protocol: int = 1  # the newest protocol version the worker speaks
    features: str | None = None  # optional features it supports, space-separated (``census``); absent: none


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """The daemon's answer to an accepted hello: the protocol version both sides use from now on."""

    TAG: ClassVar[str] = "welcome"
    protocol: int


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    """Telemetry sent by the worker after every optimizer step (memory in bytes, time in seconds)."""

    TAG: ClassVar[str] = "step"
    step: int
    batch: int
    accum: int
    loss: float
    step_seconds: float
    mlx_active: int | None  # None (nil, version 2 frames): not measured, which is not 0
    mlx_cache: int | None  # None: not measured
    mlx_peak: int
    footprint: int
    tokens_per_second: float | None = None  # absent: not measured
    val_loss: float | None = None  # absent: no validation loss this step


MAX_STEPS_ROWS: Final = 256  # rows of a ``steps`` frame at most: about 27 kB packed, well under MAX_MESSAGE_BYTES


@dataclasses.dataclass(frozen=True, slots=True)
class Steps:
    """The telemetry of several held steps in one frame, one list per ``Step`` field, in ``Step``'s order (row i
    of every list is the i-th step, in the order they ran; steps strictly increase). Sent only to a daemon whose
    heartbeat carries ``hold_rows``, with at most that many rows (and at most ``MAX_STEPS_ROWS``): the daemon
    handles a whole frame at about the cost of one step. An optional column absent, or nil in a row: not
    measured."""

    TAG: ClassVar[str] = "steps"
    step: tuple[int, ...]
    batch: tuple[int, ...]
    accum: tuple[int, ...]
    loss: tuple[float, ...]
    step_seconds: tuple[float, ...]
    mlx_active: tuple[int | None, ...]
    mlx_cache: tuple[int | None, ...]
    mlx_peak: tuple[int, ...]
    footprint: tuple[int, ...]
    tokens_per_second: tuple[float | None, ...] | None = None
    val_loss: tuple[float | None, ...] | None = None

    @classmethod
    def of(cls, steps: Sequence[Step]) -> Steps:
        """The rows of ``steps`` as one message (an optional column only when some row has a value)."""
        columns: dict[str, Any] = {}
        for field in _FIELDS[Step.TAG]:
            column = tuple(getattr(s, field.name) for s in steps)
            columns[field.name] = column if field.required or any(v is not None for v in column) else None
        return cls(**columns)

    def __len__(self) -> int:
        return len(self.step)

    def row(self, index: int) -> Step:
        """Row ``index`` as a ``Step``."""
        values: list[Any] = [None if (column := getattr(self, f.name)) is None else column[index]
                             for f in _FIELDS[Step.TAG]]
        return Step(*values)

    def rows(self) -> list[Step]:
        """One ``Step`` per row."""
        return [self.row(index) for index in range(len(self))]


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
    """Last message of a worker before it exits on its own terms (``finished``, else why it checkpointed)."""

    TAG: ClassVar[str] = "goodbye"
    reason: str
    step: int


@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat:
    """Liveness, both ways. ``sent_at`` is the sender's wall clock (same machine). A worker's heartbeat may
    carry its spawn token: before its hello (while it loads a model) that is how the daemon knows it is alive.

    The daemon's heartbeats may say how the worker may hold its step telemetry: while its footprint plus the
    step's transient, and that footprint's trend ``hold_horizon`` steps ahead, stay under ``hold_below`` bytes,
    steps may wait up to ``hold`` seconds and go out together (one wakeup of the daemon for many steps); any
    other step goes out at once, with the held ones before it. Absent: every step is sent at once."""

    TAG: ClassVar[str] = "heartbeat"
    sent_at: float
    token: str | None = None
    hold: float | None = None
    hold_below: int | None = None
    hold_horizon: int | None = None
    hold_rows: int | None = None  # held steps may go out as ``steps`` frames of at most this many rows
    # A gang's collectives block without a timeout when a peer is stopped or lost (or deadlocks). The daemon's
    # ``report_waiting = 1`` lets a worker blocked inside one say so: its heartbeats then carry ``waiting`` (the
    # collective, e.g. all_sum) and ``waiting_seconds``, and such a heartbeat is no sign of life (the rank makes
    # no progress), only the diagnosis of a gang hang. A worker never sends them unless its daemon asked.
    report_waiting: int | None = None  # daemon only
    waiting: str | None = None  # worker only
    waiting_seconds: float | None = None  # worker only, with waiting


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    """An instruction from the daemon, honoured by the worker at its next step boundary."""

    TAG: ClassVar[str] = "command"
    CLEAR_CACHE: ClassVar[str] = "clear_cache"
    CHECKPOINT: ClassVar[str] = "checkpoint"
    CHECKPOINT_EXIT: ClassVar[str] = "checkpoint_exit"
    CENSUS: ClassVar[str] = "census"  # only to a worker whose hello lists the ``census`` feature
    ACTIONS: ClassVar[frozenset[str]] = frozenset({CLEAR_CACHE, CHECKPOINT, CHECKPOINT_EXIT, CENSUS})
    action: str
    reason: str
    steps: int | None = None  # census: steps between its two counts


MAX_CENSUS_ROWS: Final = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Census:
    """The answer to a ``census`` command: the holders whose reachable memory grew between two counts taken at
    step boundaries ``first_step`` and ``last_step``, one row per holder (a list per column, at most
    ``MAX_CENSUS_ROWS`` rows, largest growth first). Sent only in answer to a ``census`` command."""

    TAG: ClassVar[str] = "census"
    first_step: int
    last_step: int
    seconds: float  # the two walks together
    arrays: int  # distinct MLX arrays found by the later walk
    array_bytes: int  # their bytes
    visited: int  # objects the later walk visited
    limit: int  # the most objects a walk visits (visited == limit: the walk stopped there)
    name: tuple[str, ...]
    kind: tuple[str, ...]  # the holder's type, e.g. list or dict
    place: tuple[str, ...]  # where the name lives, e.g. train.py:main (a local) or train.py (a global)
    items: tuple[int, ...]  # its items at the later count
    items_per_step: tuple[float, ...]
    mlx_bytes: tuple[int, ...]  # bytes of MLX arrays attributed to it at the later count
    mlx_bytes_per_step: tuple[float, ...]
    other_bytes_per_step: tuple[float, ...]  # bytes, bytearray and numpy buffers
    contents: tuple[str, ...]  # what its items are, e.g. tuple(dict[str, array], array)


@dataclasses.dataclass(frozen=True, slots=True)
class Standby:
    """First message of a worker spawned as a standby (``MLXSUP_STANDBY=1``): it proves its spawn with its own
    token, has loaded nothing, and waits for ``go``. Sent only when the daemon asked for a standby, which it does
    only for a job whose workers' hellos list the ``standby`` feature."""

    TAG: ClassVar[str] = "standby"
    token: str
    pid: int
    job: str
    protocol: int = 1  # the newest protocol version the worker speaks


@dataclasses.dataclass(frozen=True, slots=True)
class Go:
    """The daemon's order to a waiting standby: become the job's worker now, at this batch x accumulation, from
    this checkpoint (the newest on disk when it was sent; "" and step 0: none). The standby then restores,
    says ``hello`` with its token and steps as any worker."""

    TAG: ClassVar[str] = "go"
    batch: int
    accum: int
    checkpoint: str
    step: int


Message = Hello | Welcome | Step | Steps | CheckpointSaved | Goodbye | Heartbeat | Command | Census | Standby | Go
FROM_WORKER: Final = frozenset({Hello.TAG, Step.TAG, Steps.TAG, CheckpointSaved.TAG, Goodbye.TAG, Heartbeat.TAG,
                                Census.TAG, Standby.TAG})
FROM_DAEMON: Final = frozenset({Welcome.TAG, Heartbeat.TAG, Command.TAG, Go.TAG})


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: type[Any]  # int, float or str
    required: bool
    default: Any
    nullable: bool  # nil on the wire: "absent" for an optional field, "not measured" (None) for a required one


def _fields_of(cls: type[Any]) -> tuple[_Field, ...]:
    hints = get_type_hints(cls)
    fields = []
    for field in dataclasses.fields(cls):
        kind, nullable = hints[field.name], False
        if get_origin(kind) in (Union, types.UnionType):
            (kind,) = (arg for arg in get_args(kind) if arg is not type(None))
            nullable = True
        required = field.default is dataclasses.MISSING
        fields.append(_Field(field.name, kind, required, None if required else field.default, nullable))
    return tuple(fields)


_TYPES: Final[dict[str, type[Any]]] = {
    cls.TAG: cls for cls in (Hello, Welcome, Step, Steps, CheckpointSaved, Goodbye, Heartbeat, Command, Census,
                             Standby, Go)
}
_FIELDS: Final[dict[str, tuple[_Field, ...]]] = {tag: _fields_of(cls) for tag, cls in _TYPES.items()}
_PACKER: Final = msgpack.Packer(use_bin_type=True)  # reused: encode runs once per training step


def negotiate(worker_max: int) -> int:
    """The version a daemon speaking ``PROTOCOL_VERSION`` uses with a worker whose hello says ``worker_max``."""
    if worker_max < MIN_PROTOCOL_VERSION:
        raise ProtocolError(f"worker speaks protocol {worker_max}, the oldest supported is {MIN_PROTOCOL_VERSION}",
                            "version")
    return min(worker_max, PROTOCOL_VERSION)


def encode(message: Message, version: int = MIN_PROTOCOL_VERSION) -> bytes:
    """Serialize one message to a frame written in ``version`` (by default 1, which every peer reads: a sender
    passes the version its welcome agreed); optional fields holding their default are left out."""
    body: dict[str, Any] = {"v": version, "t": message.TAG}
    for field in _FIELDS[message.TAG]:
        value = getattr(message, field.name)
        if field.required or value != field.default:
            body[field.name] = value
    return _PACKER.pack(body)  # type: ignore[no-any-return]


def decode_parts(parts: Sequence[bytes]) -> Message:
    """Decode one ZeroMQ message as received (``recv_multipart``): a message of more than one part is refused
    whole (``multipart``), even when its first part is a valid frame (docs/PROTOCOL.md section 2)."""
    if len(parts) != 1:
        raise ProtocolError(f"a message of {len(parts)} parts: a frame is one single-part message", "multipart")
    return decode(parts[0])


def decode(frame: bytes) -> Message:
    """Parse and validate one frame; raise ProtocolError naming the problem. Unknown fields are ignored."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the maximum of {MAX_MESSAGE_BYTES}", "too_large")
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"frame is not valid msgpack: {exc.__class__.__name__}: {exc}", "not_msgpack") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"frame must be a map, got {type(body).__name__}", "not_a_map")
    version = body.get("v")
    if isinstance(version, bool) or not isinstance(version, int) or not (
            MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION):
        raise ProtocolError(f"protocol version {version!r} is not supported (this side speaks "
                            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})", "version")
    tag = body.get("t")
    if tag == Steps.TAG:
        return _steps(body)
    if tag == Census.TAG:
        return _census(body)
    if not isinstance(tag, str) or tag not in _TYPES:
        raise ProtocolError(f"unknown message type {str(tag)[:64]!r}", "unknown_type")
    values = {field.name: _check(tag, field, body) for field in _FIELDS[tag]}
    message: Message = _TYPES[tag](**values)
    if isinstance(message, Command) and message.action not in Command.ACTIONS:
        raise ProtocolError(f"command: unknown action {message.action[:64]!r}", "field_value")
    if isinstance(message, Go) and (message.batch < 1 or message.accum < 1):
        raise ProtocolError(f"go: batch {message.batch} x accum {message.accum}: both must be at least 1",
                            "field_value")
    if isinstance(message, Hello | Welcome | Standby) and message.protocol < 1:
        raise ProtocolError(f"{tag}.protocol: version {message.protocol} is not a protocol version", "field_value")
    return message


_INTS: Final = frozenset({int})
_OPTIONAL_INTS: Final = frozenset({int, type(None)})
_NUMBERS: Final = frozenset({int, float})
_OPTIONAL_NUMBERS: Final = frozenset({int, float, type(None)})


def _steps(body: dict[str, Any]) -> Steps:
    """A ``steps`` frame: each of ``Step``'s fields as a list, checked a column at a time with C loops, not a
    value at a time (a frame of 256 rows must cost the daemon about what one step does). ``step``, the first
    field, sets the number of rows."""
    columns: dict[str, tuple[Any, ...] | None] = {}
    count = 0
    for field in _FIELDS[Step.TAG]:
        name = field.name
        column = body.get(name)
        if column is None:
            if field.required:
                raise ProtocolError(f"steps: missing field {name!r}", "missing_field")
            columns[name] = None
            continue
        if not isinstance(column, list):
            raise ProtocolError(f"steps.{name}: expected a list, got {type(column).__name__}", "field_type")
        if not count:
            count = len(column)
            if not 1 <= count <= MAX_STEPS_ROWS:
                raise ProtocolError(f"steps.{name}: {count} rows, expected 1..{MAX_STEPS_ROWS}", "field_value")
        elif len(column) != count:
            raise ProtocolError(f"steps.{name}: {len(column)} rows, 'step' has {count}", "field_value")
        kinds = set(map(type, column))
        nil_ok = field.nullable
        allowed = (_OPTIONAL_INTS if nil_ok else _INTS) if field.kind is int else (
            _OPTIONAL_NUMBERS if nil_ok else _NUMBERS)
        if not kinds <= allowed:
            bad = next(k for k in kinds if k not in allowed)
            expected = "integers" if field.kind is int else "numbers"
            raise ProtocolError(f"steps.{name}: expected {expected}, got {bad.__name__}", "field_type")
        if field.kind is int:
            values = [v for v in column if v is not None] if nil_ok and type(None) in kinds else column
            if values and (min(values) < 0 or max(values) > MAX_INT):
                raise ProtocolError(f"steps.{name}: a value is outside 0..2**63-1", "field_value")
        else:
            if any(map(math.isinf, [v for v in column if v is not None] if nil_ok else column)):
                raise ProtocolError(f"steps.{name}: infinite value", "field_value")
            if int in kinds:
                column = [None if v is None else float(v) for v in column]
        columns[name] = tuple(column)
    rows = columns["step"]
    assert rows is not None  # a required field
    if not all(map(operator.lt, rows, rows[1:])):
        raise ProtocolError("steps.step: steps must strictly increase", "field_value")
    return Steps(**columns)  # type: ignore[arg-type]


def _census(body: dict[str, Any]) -> Census:
    """A ``census`` frame: scalar fields as everywhere, then columns of equal length (0..MAX_CENSUS_ROWS)."""
    values: dict[str, Any] = {}
    rows: int | None = None
    for field in _FIELDS[Census.TAG]:
        if get_origin(field.kind) is not tuple:
            values[field.name] = _check(Census.TAG, field, body)
            continue
        column = body.get(field.name)
        if column is None:
            raise ProtocolError(f"census: missing field {field.name!r}", "missing_field")
        if not isinstance(column, list):
            raise ProtocolError(f"census.{field.name}: expected a list, got {type(column).__name__}", "field_type")
        if rows is None and len(column) > MAX_CENSUS_ROWS:
            raise ProtocolError(f"census.{field.name}: {len(column)} rows, at most {MAX_CENSUS_ROWS}", "field_value")
        if rows is not None and len(column) != rows:
            raise ProtocolError(f"census.{field.name}: {len(column)} rows, 'name' has {rows}", "field_value")
        rows = len(column)
        cell = _Field(field.name, get_args(field.kind)[0], True, None, False)
        values[field.name] = tuple(_check(Census.TAG, cell, {field.name: value}) for value in column)
    return Census(**values)


_KIND_NAMES: Final = {int: "an integer", float: "a number", str: "a string"}


def _check(tag: str, field: _Field, body: dict[str, Any]) -> Any:
    name, kind = field.name, field.kind
    value = body.get(name)
    if value is None:
        if field.required and name not in body:
            raise ProtocolError(f"{tag}: missing field {name!r}", "missing_field")
        if not field.required:
            return field.default  # nil in an optional field: absent
        if field.nullable:
            return None  # nil in a required field that allows it: not measured
        raise ProtocolError(f"{tag}.{name}: expected {_KIND_NAMES[kind]}, got nil", "field_type")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProtocolError(f"{tag}.{name}: expected an integer, got {type(value).__name__}", "field_type")
        if not 0 <= value <= MAX_INT:
            raise ProtocolError(f"{tag}.{name}: {value} is outside 0..2**63-1", "field_value")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{tag}.{name}: expected a number, got {type(value).__name__}", "field_type")
        value = float(value)
        if math.isinf(value):
            raise ProtocolError(f"{tag}.{name}: infinite value", "field_value")
        return value  # NaN is legal: a diverged loss is worth reporting
    if kind is str:
        if not isinstance(value, str):
            raise ProtocolError(f"{tag}.{name}: expected a string, got {type(value).__name__}", "field_type")
        if len(value) > MAX_STRING_CHARS:
            raise ProtocolError(f"{tag}.{name}: string of {len(value)} chars exceeds {MAX_STRING_CHARS}",
                                "field_value")
        return value
    raise ProtocolError(f"{tag}.{name}: unsupported field type {kind!r}")  # pragma: no cover
