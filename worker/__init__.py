"""The worker side of mlx-supervisor: the Session SDK and the built-in MLX jobs.

A training loop needs three calls: ``Session.from_env()``, ``session.resume(model, optimizer)`` and
``session.end_step(step, loss)``. See docs/sdk.md for a complete example.

``Session`` is imported lazily so that the daemon can read ``worker.cli`` without importing MLX.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Resumed", "Session"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from worker import session

        return getattr(session, name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
