"""The census: which names in the training loop hold the memory that grows.

A count attributes the bytes of the MLX arrays reachable from each name to that name. The names are the locals
of the frame that called ``end_step`` (the user's loop) and the globals of its module; an instance of a user
class is looked into, one name per attribute (``tracker.kept``). Every array is counted once, by identity, for
the first name that reaches it; the model and the optimizer are walked first, so their arrays are theirs. Bytes
of ``bytes``, ``bytearray`` and numpy buffers are counted apart (memory outside MLX), and so are the items of
each holder. The walk is bounded (``limit`` objects) and timed. It reads sizes only (``nbytes`` of an array is
its shape times its item size): nothing is evaluated, copied or changed, so training goes on bit for bit.

Two counts ``steps`` apart give the answer (``grown``): the holders whose counts grew, per step.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
import types
from collections.abc import Iterator
from typing import Any

import mlx.core as mx

from protocol.messages import MAX_CENSUS_ROWS, Census

LIMIT = 200_000  # objects one count visits at most
CONTAINERS = (list, tuple, dict, set, frozenset, collections.deque)
OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.FrameType,
          types.CodeType, types.GeneratorType, str, int, float, complex, bool, type(None))
TEXT = 160  # characters at most of a name, place or contents


@dataclasses.dataclass
class Holding:
    """What one name holds."""

    kind: str
    items: int = 0
    mlx_bytes: int = 0
    other_bytes: int = 0
    contents: str = ""


@dataclasses.dataclass
class Count:
    """One count: (name, place) -> what it holds, with the walk's totals."""

    step: int
    holders: dict[tuple[str, str], Holding]
    arrays: int
    array_bytes: int
    visited: int
    limit: int
    seconds: float


def describe(value: Any, depth: int = 2) -> str:
    """A short type description of one item, e.g. ``tuple(dict[str, array], array)``."""
    if isinstance(value, mx.array):
        return "array"
    name = type(value).__name__
    if depth <= 0 or not isinstance(value, CONTAINERS) or not value:
        return name
    if isinstance(value, dict):
        key, item = next(reversed(value.items()))
        return f"{name}[{describe(key, 0)}, {describe(item, depth - 1)}]"
    if isinstance(value, tuple):
        return f"{name}({', '.join(describe(v, depth - 1) for v in value[:4])}{', ...' if len(value) > 4 else ''})"
    last = value[-1] if isinstance(value, list | collections.deque) else next(iter(value))
    return f"{name}[{describe(last, depth - 1)}]"


def _children(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, CONTAINERS):
        yield from value
    elif not isinstance(value, OPAQUE) and hasattr(value, "__dict__"):
        yield from vars(value).values()


class _Walk:
    """Shared by every name of one count: what was seen (each array and object once) and the budget left."""

    def __init__(self, limit: int) -> None:
        self.seen: set[int] = set()
        self.left = limit
        self.arrays = 0
        self.array_bytes = 0

    def hold(self, root: Any) -> Holding:
        holding = Holding(type(root).__name__, len(root) if isinstance(root, CONTAINERS) else 0,
                          contents=_contents(root))
        stack = [root]
        seen = self.seen
        while stack and self.left > 0:
            value = stack.pop()
            key = id(value)
            if key in seen:
                continue
            seen.add(key)
            self.left -= 1
            if isinstance(value, mx.array):
                holding.mlx_bytes += value.nbytes
                self.arrays += 1
                self.array_bytes += value.nbytes
            elif isinstance(value, bytes | bytearray | memoryview):
                holding.other_bytes += len(value)
            elif type(value).__name__ == "ndarray" and isinstance(getattr(value, "nbytes", None), int):
                holding.other_bytes += value.nbytes
            elif not isinstance(value, OPAQUE):
                stack.extend(_children(value))
        return holding


def _contents(value: Any) -> str:
    if isinstance(value, dict) and value:
        return describe(next(reversed(value.values())))
    if isinstance(value, list | tuple | collections.deque) and value:
        return describe(value[-1])
    return ""


def _user_object(value: Any) -> bool:
    """An instance of a class from the user's code (looked into one attribute at a time)."""
    module = getattr(type(value), "__module__", "") or ""
    return (not isinstance(value, OPAQUE + CONTAINERS + (mx.array,)) and hasattr(value, "__dict__")
            and not module.startswith(("mlx", "builtins", "worker", "protocol", "zmq", "numpy")))


def _roots(frame: types.FrameType, model: Any, optimizer: Any) -> list[tuple[str, str, Any]]:
    """(name, place, value) in walk order: the model, the optimizer, the loop's locals, its module's globals."""
    code = frame.f_code
    where = os.path.basename(code.co_filename)
    local, module = f"{where}:{code.co_name}", where
    names: list[tuple[str, str, Any]] = []
    for value, label in ((model, "model"), (optimizer, "optimizer")):
        if value is not None:
            found = next((n for n, v in frame.f_locals.items() if v is value), label)
            names.append((found, local, value))
    scopes = [(local, dict(frame.f_locals))]
    if frame.f_globals is not frame.f_locals:
        scopes.append((module, dict(frame.f_globals)))
    for place, scope in scopes:
        for name, value in scope.items():
            if name.startswith("__") or isinstance(value, OPAQUE) or value is model or value is optimizer:
                continue
            if _user_object(value):
                names += [(f"{name}.{attr}", place, item) for attr, item in vars(value).items()
                          if not isinstance(item, OPAQUE)]
            else:
                names.append((name, place, value))
    return names


def count(frame: types.FrameType, step: int, model: Any = None, optimizer: Any = None, limit: int = LIMIT) -> Count:
    """Count what every name of the loop's frame holds (see the module's docstring)."""
    started = time.perf_counter()
    walk = _Walk(limit)
    holders: dict[tuple[str, str], Holding] = {}
    for name, place, value in _roots(frame, model, optimizer):
        if (name, place) not in holders:
            holders[(name, place)] = walk.hold(value)
    return Count(step, holders, walk.arrays, walk.array_bytes, limit - walk.left, limit,
                 time.perf_counter() - started)


def grown(first: Count, last: Count) -> Census:
    """The holders whose counts grew from ``first`` to ``last``, per step, largest first."""
    steps = max(1, last.step - first.step)
    rows = []
    for key, now in last.holders.items():
        before = first.holders.get(key, Holding(now.kind))
        mlx = (now.mlx_bytes - before.mlx_bytes) / steps
        other = (now.other_bytes - before.other_bytes) / steps
        items = (now.items - before.items) / steps
        if mlx > 0 or other > 0 or items > 0:
            rows.append((key, now, mlx, other, items))
    rows.sort(key=lambda row: (-(row[2] + row[3]), -row[4]))
    rows = rows[:MAX_CENSUS_ROWS]
    return Census(
        first.step, last.step, round(first.seconds + last.seconds, 6), last.arrays, last.array_bytes, last.visited,
        last.limit, tuple(k[0][:TEXT] for k, *_ in rows), tuple(h.kind[:TEXT] for _, h, *_ in rows),
        tuple(k[1][:TEXT] for k, *_ in rows), tuple(h.items for _, h, *_ in rows),
        tuple(round(r[4], 3) for r in rows), tuple(h.mlx_bytes for _, h, *_ in rows),
        tuple(round(r[2], 1) for r in rows), tuple(round(r[3], 1) for r in rows),
        tuple(h.contents[:TEXT] for _, h, *_ in rows))


class Taker:
    """A census asked for by the daemon, taken at step boundaries: the first count at the next boundary, the
    second ``steps`` steps later, then the answer."""

    def __init__(self) -> None:
        self.steps = 0  # 0: no census asked for
        self.first: Count | None = None

    def ask(self, steps: int) -> None:
        """A ``census`` command (one at a time: a second one while the first runs is ignored)."""
        if not self.steps:
            self.steps = max(1, steps)

    def at_boundary(self, frame: types.FrameType, step: int, model: Any, optimizer: Any) -> Census | None:
        """Count now if due; the answer once both counts are taken."""
        if not self.steps:
            return None
        first = self.first
        if first is None:
            self.first = count(frame, step, model, optimizer)
            return None
        if step < first.step + self.steps:
            return None
        self.first, self.steps = None, 0
        return grown(first, count(frame, step, model, optimizer))
