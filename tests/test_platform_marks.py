"""The suite is honest about platforms: Linux-only tests say so, every darwin path has a real test for a Mac, and
every fake of a macOS fact names the real test (tests/test_darwin_real.py) that checks the same fact on a Mac."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REAL = "tests/test_darwin_real.py"
# A test of a macOS fact on a fake: "fake" in its id, and a macOS thing named beside it.
FAKE = re.compile(r"fake", re.IGNORECASE)
MACOS_THING = re.compile(r"macos|darwin|libproc|libsystem|launch|waitid|fcntl|fullfsync|sysctl|pressure|confstr",
                         re.IGNORECASE)
# Fakes of tools rather than of macOS facts: tests/sysdeps.sh against a fake Homebrew, which CI's macOS jobs run for
# real (`make test` installs the Rust toolchain through it).
NOT_MACOS_FACTS = ("tests/test_platform_marks.py", REAL, "tests/test_sysdeps.py")
# What only Linux has; a test module that uses one must mark the tests that do (linux_only).
LINUX_THINGS = ("/proc/", "pidfd", "epoll", "netns", "systemd-analyze", "ns_last_pid", "tmpfs", "prctl")
# The darwin paths of the project, each with its real test here (issue 22).
DARWIN_PATHS = ("proc_pid_rusage", "proc_listpgrppids", "waitid", "kern.memorystatus_vm_pressure_level",
                "F_FULLFSYNC", "confstr", "launchctl")


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every test of the suite with its platform marks, from a real collection (pytest --collect-only)."""
    out = tmp_path_factory.mktemp("marks") / "marks.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests._marks_plugin",
                           "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLXSUP_MARKS_OUT": str(out)}, check=False)
    assert done.returncode == 0 and out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


class TestFakesNameTheirRealTest:
    """Each fake test of a macOS fact names an existing real test; each real test runs a real call on a Mac."""

    def test_every_macos_fake_names_a_real_test(self, collected: list[dict[str, Any]]) -> None:
        unnamed = [row["nodeid"] for row in collected
                   if FAKE.search(row["nodeid"]) and MACOS_THING.search(row["nodeid"])
                   and not row["nodeid"].startswith(NOT_MACOS_FACTS)
                   and not row["marks"]["darwin_real"]]
        assert unnamed == [], f"fake tests of macOS facts without @pytest.mark.darwin_real(...): {unnamed}"

    def test_every_named_real_test_exists(self, collected: list[dict[str, Any]]) -> None:
        real = {row["nodeid"].removeprefix(REAL + "::") for row in collected if row["nodeid"].startswith(REAL)}
        named = {(row["nodeid"], args[0] if len(args) == 1 else repr(args))
                 for row in collected for args in row["marks"]["darwin_real"]}
        assert len(named) >= 30
        assert [(fake, target) for fake, target in sorted(named) if target not in real] == []

    def test_every_real_test_is_darwin_only_with_its_call(self, collected: list[dict[str, Any]]) -> None:
        rows = [row for row in collected if row["nodeid"].startswith(REAL)]
        assert len(rows) >= 15
        assert [row["nodeid"] for row in rows if not row["marks"]["darwin_only"]] == []
        calls = " ".join(args[0] for row in rows for args in row["marks"]["darwin_only"])
        assert [path for path in DARWIN_PATHS if path not in calls] == []

    def test_no_real_test_is_marked_linux_only(self, collected: list[dict[str, Any]]) -> None:
        assert [row["nodeid"] for row in collected if row["nodeid"].startswith(REAL) and row["marks"]["linux_only"]
                ] == []


class TestLinuxOnly:
    """A module that reaches for a Linux-only facility marks the tests that do; every mark gives its reason."""

    def test_modules_using_linux_only_facilities_mark_them(self, collected: list[dict[str, Any]]) -> None:
        marked = {row["nodeid"].split("::")[0] for row in collected if row["marks"]["linux_only"]}
        users = {f"tests/{path.name}" for path in (ROOT / "tests").glob("test_*.py")
                 if path.name != Path(__file__).name and any(thing in path.read_text() for thing in LINUX_THINGS)}
        assert users and sorted(users - marked) == []

    def test_every_platform_mark_gives_one_reason(self, collected: list[dict[str, Any]]) -> None:
        bad = [(row["nodeid"], name, args) for row in collected for name in ("linux_only", "darwin_only")
               for args in row["marks"][name] if len(args) != 1 or not isinstance(args[0], str) or not args[0]]
        assert bad == []


@pytest.mark.skipif(sys.platform == "darwin", reason="checks how the real tests are skipped off macOS")
def test_off_macos_every_real_test_is_skipped_naming_the_platform_and_the_call() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", REAL], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(f"this is {sys.platform}" in line and "macOS only (the real call: " in line
                         for line in skips), done.stdout[-3000:]
    assert re.search(r"\d+ skipped", done.stdout) and " passed" not in done.stdout
