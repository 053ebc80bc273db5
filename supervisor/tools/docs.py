"""``python -m supervisor.tools.docs``: the config reference, generated from the config dataclasses.

docs/config.md carries this output verbatim; a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

from supervisor.config import ControlConfig, DaemonConfig, GangConfig, JobConfig

SECTIONS: list[tuple[str, type[Any]]] = [
    ("[daemon]", DaemonConfig), ("[daemon.control]", ControlConfig), ("[jobs.NAME]", JobConfig),
    ("[jobs.NAME.gang]", GangConfig),
]


def config_reference() -> str:
    lines: list[str] = []
    for title, cls in SECTIONS:
        lines += [f"#### `{title}`", "", "| key | default | unit | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            if field.name in ("control", "gang"):  # nested tables: their own sections
                continue
            default: Any = field.default
            if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
                default = cast(Callable[[], Any], field.default_factory)()
            shown = "`" + (repr(default) if not isinstance(default, str) else f'"{default}"') + "`"
            lines.append(f"| `{field.name}` | {shown} | {field.metadata.get('unit', '')} | "
                         f"{field.metadata['help']} |")
        lines.append("")
    lines += mlx_lm_reference()
    return "\n".join(lines).rstrip() + "\n"


def mlx_lm_reference() -> list[str]:
    """The ``[jobs.NAME.mlx_lm]`` table: mlx_lm.lora's options as ``python -m worker.mlx_lm`` takes them."""
    from worker.mlx_lm.options import OPTIONS

    lines = ["#### `[jobs.NAME.mlx_lm]`", "", "| key | default | unit | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        if option.cli and option.name != "checkpoint_dir":
            shown = "`" + (repr(option.default) if not isinstance(option.default, str) else f'"{option.default}"')
            lines.append(f"| `{option.name}` | {shown}` |  | {option.help} |")
    return [*lines, ""]


if __name__ == "__main__":
    print(config_reference(), end="")
