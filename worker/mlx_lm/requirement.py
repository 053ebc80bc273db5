"""Which mlx-lm the mlx-lm job kind was tested with, checked without importing mlx-lm.

The driver calls mlx-lm's own pieces (model loading, LoRA/DoRA conversion, datasets, the loss) whose
signatures change between minor releases, so it refuses an mlx-lm outside the tested range up front, with the
installed version, the range and the command that fixes it. pyproject.toml's ``mlx-lm`` extra pins the same
range (a test keeps the two equal).
"""

from __future__ import annotations

import re
from importlib import metadata

REQUIREMENT = "mlx-lm>=0.32.2,<0.33"
_LOWEST = (0, 32, 2)
_BELOW = (0, 33, 0)
INSTALL = "pip install 'mlx-supervisor[mlx-lm]'"


class MlxLmUnavailable(RuntimeError):
    """mlx-lm is missing or outside the tested range; the message says which and how to fix it."""


def installed_version() -> str | None:
    """The installed mlx-lm distribution's version, or None; reads metadata only (no import)."""
    try:
        return metadata.version("mlx-lm")
    except metadata.PackageNotFoundError:
        return None


def check(version: str | None) -> str:
    """Return ``version`` when it is in the tested range; raise MlxLmUnavailable naming the problem."""
    if version is None:
        raise MlxLmUnavailable(f"mlx-lm is not installed; the mlx_lm job kind needs {REQUIREMENT}: {INSTALL}")
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    parts = tuple(int(p or 0) for p in match.groups()) if match else None
    if parts is None or not _LOWEST <= parts < _BELOW:
        raise MlxLmUnavailable(f"mlx-lm {version} is installed, but the mlx_lm job kind is tested with "
                               f"{REQUIREMENT} only: {INSTALL} (or pip install '{REQUIREMENT}')")
    return version


def require() -> str:
    """Check the installed mlx-lm; return its version."""
    return check(installed_version())
