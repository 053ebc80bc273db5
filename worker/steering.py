"""What the conformance kit asks of a worker under test (docs/PROTOCOL.md section 9); the daemon never sets it.

A slow load before the hello, and every N-th step slow: the SDK spends that time where a real long load or
evaluation would be, inside ``busy()``, so the kit sees the heartbeats, keepalives and watchdog of a real one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

PREFIX = "MLXSUP_CONFORMANCE_"


@dataclasses.dataclass(frozen=True)
class Steering:
    """``MLXSUP_CONFORMANCE_LOAD_SECONDS``, ``..._SLOW_EVERY`` and ``..._SLOW_SECONDS``; all 0 when unset."""

    load_seconds: float = 0.0
    slow_every: int = 0
    slow_seconds: float = 0.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Steering:
        values: dict[str, float | int] = {}
        for field in dataclasses.fields(cls):
            name, raw = PREFIX + field.name.upper(), env.get(PREFIX + field.name.upper(), "")
            kind = float if field.name.endswith("seconds") else int
            try:
                values[field.name] = kind(raw) if raw else kind(0)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
            if values[field.name] < 0:
                raise ValueError(f"{name}={raw!r} is negative")
        return cls(**values)  # type: ignore[arg-type]

    def slow(self, step: int) -> bool:
        """Whether step ``step`` is one of the long ones."""
        return bool(self.slow_every) and step % self.slow_every == 0
