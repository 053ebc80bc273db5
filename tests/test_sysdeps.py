"""A fresh machine's `make test`: tests/sysdeps.sh installs the Rust toolchain where it can, and where it cannot
the Rust tests skip with the reason and the run says so (tests/rust_toolchain.py).

The install script runs for real, against fake apt-get, dpkg-query, id, uname and brew on its PATH (named fake_*: the
real ones would change this machine); they record how they were called.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.rust_toolchain import NEEDED, plan

SCRIPT = ROOT / "tests" / "sysdeps.sh"


def fake_bin(tmp_path: Path, system: str, uid: int, installed: bool, apt: bool = True, brew: bool = False,
             install_ok: bool = True) -> Path:
    """A PATH of fakes that log their argv to calls.log (plus the real `timeout`)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"

    def tool(name: str, body: str) -> None:
        (bindir / name).write_text(f"#!/bin/sh\necho \"{name} $*\" >> {log}\n{body}\n")
        (bindir / name).chmod(0o755)

    tool("uname", f"echo {system}")
    tool("id", f"echo {uid}")
    os.symlink(shutil.which("timeout") or "/usr/bin/timeout", bindir / "timeout")
    if apt:
        # dpkg's state of every package: "ii" installed, "rc" removed with its config files left (which
        # `dpkg -s` would still call installed).
        tool("dpkg-query", "echo ii" if installed else "echo rc")
        tool("apt-get", "exit 0" if install_ok else "exit 100")
    if brew:
        tool("brew", 'case "$1" in list) exit ' + ("0" if installed else "1") + ";; *) exit 0;; esac")
    return bindir


def run(tmp_path: Path, bindir: Path) -> tuple[str, list[str]]:
    done = subprocess.run(["/bin/bash", str(SCRIPT)], env={"PATH": str(bindir)}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr  # never fatal
    log = tmp_path / "calls.log"
    return done.stdout, log.read_text().splitlines() if log.exists() else []


class TestInstallScript:
    """tests/sysdeps.sh installs what is missing where it may, and otherwise says how."""

    def test_fake_debian_as_root_installs_the_rust_packages_once_updated(self, tmp_path: Path) -> None:
        out, calls = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=False))
        installs = [c for c in calls if c.startswith("apt-get") and " install " in c]
        assert [c for c in calls if c.startswith("apt-get update")] == ["apt-get update -qq"]  # once for all groups
        assert any("cargo" in c and "librust-zmq-dev" in c and "libzmq3-dev" in c for c in installs), calls
        assert any(c.endswith("systemd") for c in installs), calls
        assert "rust: installed" in out

    def test_fake_debian_as_root_installs_open_mpi_with_the_libmpi_so_mlx_dlopens(self, tmp_path: Path) -> None:
        out, calls = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=False))
        assert "apt-get install -y -qq openmpi-bin libopenmpi-dev" in calls, calls
        assert "mpi: installed" in out

    def test_fake_debian_failed_mpi_install_is_not_fatal(self, tmp_path: Path) -> None:
        out, _ = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=False, install_ok=False))
        assert "mpi: NOT installed (apt-get install openmpi-bin libopenmpi-dev failed)" in out

    def test_fake_debian_with_everything_present_installs_nothing(self, tmp_path: Path) -> None:
        out, calls = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=True))
        assert not [c for c in calls if c.startswith("apt-get")], calls
        assert "rust: present" in out

    def test_fake_debian_not_root_says_what_to_run(self, tmp_path: Path) -> None:
        out, calls = run(tmp_path, fake_bin(tmp_path, "Linux", 1000, installed=False))
        assert not [c for c in calls if c.startswith("apt-get")], calls
        assert "rust: missing; as root: apt-get install cargo rustc" in out

    def test_fake_debian_failed_install_is_reported_not_fatal(self, tmp_path: Path) -> None:
        out, _ = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=False, install_ok=False))
        assert "rust: NOT installed" in out and "will skip" in out

    def test_fake_macos_with_homebrew_installs_rust_and_zeromq(self, tmp_path: Path) -> None:
        out, calls = run(tmp_path, fake_bin(tmp_path, "Darwin", 501, installed=False, apt=False, brew=True))
        assert "brew install rust zeromq pkg-config" in calls, calls
        assert "systemd: not on macOS" in out

    def test_fake_macos_without_homebrew_says_how(self, tmp_path: Path) -> None:
        out, _ = run(tmp_path, fake_bin(tmp_path, "Darwin", 501, installed=False, apt=False))
        assert "no Homebrew" in out and "brew install rust zeromq" in out

    def test_fake_linux_without_apt_names_the_crates_io_switch(self, tmp_path: Path) -> None:
        out, _ = run(tmp_path, fake_bin(tmp_path, "Linux", 0, installed=False, apt=False))
        assert "MLXSUP_RUST_CRATES_IO=1" in out


def registry(tmp_path: Path, names: tuple[str, ...]) -> Path:
    path = tmp_path / "registry"
    for name in names:
        (path / f"{name}-1.0.0").mkdir(parents=True)
    return path


class TestPlan:
    """How cargo builds sdk/rust: Debian's crates offline where installed, crates.io on macOS, else a reason."""

    def test_debian_crates_build_offline_through_the_registry_config(self, tmp_path: Path) -> None:
        found = plan({"CARGO": "/x/cargo"}, "linux", registry(tmp_path, NEEDED))
        assert found.runnable and found.args[0] == "--config" and "--offline" in found.args
        assert Path(found.args[1]).read_text().count('directory = "/usr/share/cargo/registry"') == 1

    def test_a_missing_crate_is_named_in_the_reason(self, tmp_path: Path) -> None:
        found = plan({"CARGO": "/x/cargo"}, "linux", registry(tmp_path, tuple(n for n in NEEDED if n != "zmq")))
        assert not found.runnable and "lacks zmq" in (found.skip_reason or "")

    def test_macos_takes_crates_io_without_the_source_replacement(self, tmp_path: Path) -> None:
        found = plan({"CARGO": "/x/cargo"}, "darwin", tmp_path / "none")
        assert found.runnable and found.args == ()
        assert not (ROOT / "sdk" / "rust" / ".cargo" / "config.toml").exists()  # nothing replaces crates.io there

    def test_crates_io_elsewhere_only_when_asked(self, tmp_path: Path) -> None:
        asked = plan({"CARGO": "/x/cargo", "MLXSUP_RUST_CRATES_IO": "1"}, "linux", tmp_path / "none")
        assert asked.runnable and asked.args == ()

    def test_no_cargo_is_a_reason_with_the_fix(self, tmp_path: Path) -> None:
        found = plan({"PATH": str(tmp_path)}, "linux", registry(tmp_path, NEEDED))
        assert not found.runnable and "no cargo on PATH" in (found.skip_reason or "")
        assert "make sysdeps" in (found.skip_reason or "")


class TestReported:
    """Without a toolchain the Rust tests are reported as not run, in the run's last lines, and the run is green."""

    @pytest.mark.slow
    def test_a_machine_without_cargo_skips_the_rust_tests_and_says_so(self, tmp_path: Path) -> None:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("CARGO", "MLXSUP_SKIP_RUST")}
        env["PATH"] = str(bindir)  # no cargo anywhere
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_rust_sdk.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]
        assert "NOT RUN: the Rust SDK tests (sdk/rust): no cargo on PATH" in done.stdout
        assert " passed" not in done.stdout and "skipped" in done.stdout


class TestMakefile:
    """`make test` runs the install step before the suite, and `.ci/run` adds nothing to `make test`."""

    def test_make_test_runs_sysdeps_before_pytest(self) -> None:
        done = subprocess.run(["make", "-n", "test-main"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        lines = done.stdout.splitlines()
        at = [i for i, line in enumerate(lines) if "tests/sysdeps.sh" in line]
        pytest_at = [i for i, line in enumerate(lines) if "-m pytest" in line]
        assert at and pytest_at and at[0] < pytest_at[0], done.stdout

    def test_ci_run_is_make_test_and_nothing_else(self) -> None:
        lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
        steps = [line for line in lines if line and not line.startswith("#")]
        assert steps == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', "make test"], steps
