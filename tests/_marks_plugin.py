"""A pytest plugin for tests/test_platform_marks.py: after collection, write every test's platform marks as JSON.

Used as ``python -m pytest --collect-only -p tests._marks_plugin`` with MLXSUP_MARKS_OUT naming the output file.
"""

from __future__ import annotations

import json
import os

import pytest

MARKS = ("linux_only", "darwin_only", "darwin_real")


def pytest_collection_finish(session: pytest.Session) -> None:
    rows = [{"nodeid": item.nodeid,
             "marks": {name: [list(mark.args) for mark in item.iter_markers(name)] for name in MARKS}}
            for item in session.items]
    with open(os.environ["MLXSUP_MARKS_OUT"], "w") as fh:
        json.dump(rows, fh)
