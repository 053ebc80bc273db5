"""``mlxsupctl doctor`` on this machine, for real: every check runs (children allocate, a grandchild is
re-parented, MLX is imported in a child) against a private config and run dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

MUST_PASS = ("python", "footprint-self", "footprint-child", "group-sampler", "run-dir", "config")
CHECKS = ("python", "mlx", "footprint-self", "footprint-child", "group-sampler", "memory", "run-dir", "config",
          "service", "daemon")


def report(out: str) -> list[tuple[str, str, str, str]]:
    """(status, check, detail, fix) for each check line; a fix line is indented under its check."""
    checks: list[tuple[str, str, str, str]] = []
    for line in out.splitlines():
        if line.startswith(" "):
            status, name, detail, _ = checks[-1]
            assert line.strip().startswith("fix: "), line
            checks[-1] = (status, name, detail, line.strip().removeprefix("fix: "))
        else:
            status, name, detail = line.split(None, 2)
            checks.append((status, name, detail, ""))
    return checks


def test_doctor_passes_what_must_pass_and_explains_the_rest(config_file: Any, run_dir: Path) -> None:
    config = config_file({})
    done = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-c", str(config), "doctor"],
                          capture_output=True, text=True, timeout=150, check=False)
    checks = report(done.stdout)
    assert [name for _, name, _, _ in checks] == list(CHECKS), done.stdout + done.stderr
    by_name = {name: (status, detail, fix) for status, name, detail, fix in checks}
    for name in MUST_PASS:
        assert by_name[name][0] == "PASS", (name, by_name[name])
    for name, (status, detail, fix) in by_name.items():
        assert status in ("PASS", "WARN", "FAIL"), (name, status)
        assert detail.strip(), name
        if status != "PASS":
            assert fix.strip(), (name, status, detail)  # a WARN or FAIL says what to do
    assert str(run_dir) in by_name["run-dir"][1] and "private" in by_name["run-dir"][1]
    assert str(config) in by_name["config"][1]
    assert "no daemon answers" in by_name["daemon"][1]  # none runs on this private run dir
    # Exit status as documented: 0 when nothing FAILs, 1 otherwise.
    assert done.returncode == (1 if any(status == "FAIL" for status, _, _ in by_name.values()) else 0), done.stderr
