"""``python -m worker.mlx_lm`` with a record of what happens before and after its ``ready`` point.

usage: mlx_lm_ready_probe.py OUT_JSON ROOT [ROOT...] -- [python -m worker.mlx_lm's options]

Records, in order: every file opened under a ROOT (the model, data and checkpoint directories; an audit hook sees
Python's opens), every ``mx.random.seed`` and ``mx.load`` call, and the moment ``worker.mlx_lm.run.ready`` is
entered, with the modules imported by then. OUT_JSON gets ``{"events": [[kind, detail], ...], "modules_at_ready":
[...], "modules_at_end": [...], "code": exit status}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

out, rest = sys.argv[1], sys.argv[2:]
split = rest.index("--")
roots, options = [str(Path(r).resolve()) for r in rest[:split]], rest[split + 1:]
events: list[list[str]] = []
state: dict[str, Any] = {}


def audit(name: str, args: tuple[Any, ...]) -> None:
    if name == "open" and isinstance(args[0], str):
        path = str(Path(args[0]).resolve())
        if any(path == r or path.startswith(r + "/") for r in roots):
            events.append(["open", path])


sys.addaudithook(audit)

import mlx.core as mx  # noqa: E402  (after the hook, so that nothing is missed)

_seed, _load = mx.random.seed, mx.load


def seed(value: int) -> None:
    events.append(["seed", str(value)])
    _seed(value)


def load(path: str, *args: Any, **kwargs: Any) -> Any:
    events.append(["mx.load", str(path)])
    return _load(path, *args, **kwargs)


mx.random.seed, mx.load = seed, load  # type: ignore[assignment]

from worker.mlx_lm import __main__ as entry  # noqa: E402
from worker.mlx_lm import requirement  # noqa: E402

_require = requirement.require


def require() -> str:
    """Wrap ``ready`` once run.py (imported by main after require) is importable, keeping what it does."""
    version = _require()
    from worker.mlx_lm import run

    original = run.ready

    def ready(*args: Any, **kwargs: Any) -> Any:
        events.append(["ready", ""])
        state["modules_at_ready"] = sorted(sys.modules)
        return original(*args, **kwargs)

    run.ready = ready  # type: ignore[assignment]
    return version


entry.require = require  # type: ignore[assignment]
code = entry.main(options)
Path(out).write_text(json.dumps({"events": events, "modules_at_ready": state.get("modules_at_ready", []),
                                 "modules_at_end": sorted(sys.modules), "code": code}))
