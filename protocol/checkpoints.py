"""The checkpoint directory layout every SDK shares, by name only (no MLX, no hashing here).

A job's checkpoint directory holds ``ckpt-{step:010d}/`` directories, each complete and durable (built under
a ``.tmp-ckpt-*`` name and renamed into place), with a ``meta.json`` written last. The daemon only ever reads
names: the newest step tells it whether a worker life made progress.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

META_FILE: Final = "meta.json"
NAME: Final = re.compile(r"ckpt-(\d{10,})")


def checkpoint_name(step: int) -> str:
    """The directory name of checkpoint ``step``."""
    return f"ckpt-{step:010d}"


def step_of(path: Path) -> int:
    """The step encoded in a ``ckpt-{step:010d}`` directory name."""
    return int(path.name.removeprefix("ckpt-"))


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories in ``directory``, oldest first by step; by name only, nothing is verified.

    A missing directory has none; one that cannot be read raises OSError.
    """
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [(int(m.group(1)), Path(e.path)) for e in entries
             if (m := NAME.fullmatch(e.name)) and e.is_dir(follow_symlinks=False)]
    return [path for _, path in sorted(found)]


def latest_step(directory: Path) -> int | None:
    """Step of the newest checkpoint by name (cheap, unverified); None when there is none."""
    paths = list_checkpoints(directory)
    return step_of(paths[-1]) if paths else None
