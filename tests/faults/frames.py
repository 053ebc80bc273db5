"""Malformed frames for protocol fuzzing: raw random generators and hypothesis strategies.

Every control request produced here is invalid by construction (a real command always gets an unknown argument),
so the daemon must answer each one with an error and never act on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import strategies as st

from protocol import CheckpointSaved, Goodbye, Heartbeat, Hello, Message, Step, Steps, encode
from supervisor.control.commands import REGISTRY

POISON = "__fuzz__"
OVERSIZED = 300 * 1024  # above the control protocol's 256 KiB but under the socket's hard limit: error reply
WORKER_TAGS = ["hello", "step", "steps", "checkpoint_saved", "goodbye", "heartbeat", "command"]

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
           | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
keys = st.text(max_size=12) | st.integers(-5, 5) | st.binary(max_size=4)


def poison(body: Any) -> Any:
    """Make sure a request map cannot be a valid request (a real command could, e.g., shut the daemon down)."""
    if isinstance(body, dict) and body.get("v") == 1 and isinstance(body.get("cmd"), str) and body["cmd"] in REGISTRY:
        args = body.get("args")
        body["args"] = {**(args if isinstance(args, dict) else {}), POISON: 1}
    return body


control_requests = st.builds(
    poison,
    st.fixed_dictionaries({}, optional={
        "v": st.just(1) | values, "id": st.text(max_size=80) | values,
        "cmd": st.sampled_from(sorted(REGISTRY)) | st.text(max_size=40) | values,
        "args": st.dictionaries(st.text(max_size=10), values, max_size=4) | values,
        "extra": values,
    }) | st.dictionaries(keys, values, max_size=6) | values,
)

worker_messages = st.fixed_dictionaries(
    {"v": st.just(1) | values, "t": st.sampled_from(WORKER_TAGS) | values},
    optional={name: values | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
              for name in ("token", "pid", "job", "start_step", "target_steps", "batch", "accum", "step", "loss",
                           "step_seconds", "mlx_active", "mlx_cache", "mlx_peak", "footprint", "path", "seconds",
                           "nbytes", "reason", "sent_at", "action")},
)


def pack(body: Any) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _garbage(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, 512))]


def _non_map(rng: random.Random) -> list[bytes]:
    return [pack(rng.choice([None, True, 7, -1.5, "status", b"\x00", [1, 2], [{"v": 1}]]))]


def _bad_request(rng: random.Random) -> list[bytes]:
    cmd = rng.choice([*sorted(REGISTRY), "launch", "", "x" * 40, "../../bin/sh"])
    body: dict[str, Any] = {"v": rng.choice([1, 2, 0, "1", None]), "id": rng.choice(["a", "b" * 70, 5, None]),
                            "cmd": cmd, "args": rng.choice([{}, [], "x", {"job": 5}, {"job": "../x"}])}
    for key in rng.sample(["v", "id", "cmd", "args"], rng.randint(0, 2)):
        del body[key]
    return [pack(poison(body))]


def _truncated(rng: random.Random) -> list[bytes]:
    frame = pack(poison({"v": 1, "id": "t", "cmd": rng.choice(sorted(REGISTRY)), "args": {"job": "j"}}))
    return [frame[: rng.randint(1, len(frame) - 1)]]


def _multipart(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(rng.randint(0, 16)) for _ in range(rng.randint(2, 64))]


def _oversized(rng: random.Random) -> list[bytes]:
    return [b"\x81" + rng.randbytes(16) * (OVERSIZED // 16)]


def _req_envelope(rng: random.Random) -> list[bytes]:
    return [b"", *_garbage(rng)]


CONTROL_KINDS: dict[str, tuple[int, Callable[[random.Random], list[bytes]]]] = {
    "garbage": (30, _garbage), "non-map": (10, _non_map), "bad request": (25, _bad_request),
    "truncated": (15, _truncated), "multipart": (10, _multipart), "req envelope": (9, _req_envelope),
    "oversized": (1, _oversized),
}


def _valid_unauthenticated(rng: random.Random) -> list[bytes]:
    messages: list[Message] = [
        Step(10**9, 1, 1, 0.5, 0.1, 10**12, 0, 10**12, 10**12), CheckpointSaved(10**9, "/etc/passwd", 0.1, 1),
        Goodbye("finished", 10**9), Heartbeat(0.0), Hello("0" * 32, 1, "j", 0, 10, 1, 1),
        Steps.of([Step(10**9 + i, 1, 1, 0.5, 0.1, 10**12, 0, 10**12, 10**12) for i in range(3)]),
    ]
    return [encode(rng.choice(messages))]


def _bad_worker_message(rng: random.Random) -> list[bytes]:
    body: dict[str, Any] = {"v": rng.choice([1, 2, None]), "t": rng.choice([*WORKER_TAGS, "nope", 3])}
    for name in rng.sample(["step", "batch", "token", "pid", "loss", "footprint", "reason"], rng.randint(0, 4)):
        body[name] = rng.choice([1, -1, 2**63 - 1, 1.5, float("inf"), float("nan"), "x" * 5000, None, [], {}])
    return [pack(body)]


def _worker_oversized(rng: random.Random) -> list[bytes]:
    return [rng.randbytes(40 * 1024)]


WORKER_KINDS: dict[str, tuple[int, Callable[[random.Random], list[bytes]]]] = {
    "garbage": (30, _garbage), "non-map": (10, _non_map), "bad message": (25, _bad_worker_message),
    "unauthenticated": (15, _valid_unauthenticated), "truncated": (10, _truncated), "multipart": (9, _multipart),
    "large": (1, _worker_oversized),
}


def generator(kinds: dict[str, tuple[int, Callable[[random.Random], list[bytes]]]],
              rng: random.Random) -> Callable[[], tuple[str, list[bytes]]]:
    """A function returning (kind, frames) drawn by weight."""
    names = list(kinds)
    weights = [kinds[n][0] for n in names]

    def draw() -> tuple[str, list[bytes]]:
        name = rng.choices(names, weights)[0]
        return name, kinds[name][1](rng)

    return draw
