"""`mlxsupctl service` against fake `launchctl` and `systemctl` executables on PATH (tests/fake_managers/).

The fakes reproduce what launchd and systemd are documented to do, the awkward parts included: `launchctl
bootout` returns before the job has left its domain, and a bootstrap meanwhile fails with error 5. On this Linux
machine the launchd tests make `service` believe it runs on macOS (the platform choice is the OS fact faked
there); in the macOS-shaped lane they run as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.install import managers, service
from supervisor.install.managers import LABEL, UNIT, Launchd, ManagerError, parse_launchctl_print

FAKES = Path(__file__).resolve().parent / "fake_managers"


class FakeTool:
    """A fake manager executable on PATH, its state file and its call log."""

    def __init__(self, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        bindir = tmp_path / f"bin-{name}"
        bindir.mkdir()
        exe = bindir / name
        exe.write_text(f"#!{sys.executable} -I\n" + (FAKES / f"fake_{name}.py").read_text())
        exe.chmod(0o755)
        self.state, self.calls = tmp_path / f"{name}.state.json", tmp_path / f"{name}.calls"
        self.calls.touch()
        prefix = f"FAKE_{name.upper()}"
        monkeypatch.setenv(f"{prefix}_STATE", str(self.state))
        monkeypatch.setenv(f"{prefix}_CALLS", str(self.calls))
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")

    def log(self) -> list[str]:
        return self.calls.read_text().splitlines()

    def data(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.state.read_text())
        return loaded


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "mlxsup.toml"
    path.parent.mkdir()
    path.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[jobs.a]\nbudget = "50%"\n')
    return path


@pytest.fixture
def launchctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[FakeTool]:
    """A fake launchctl, with `service` believing it runs on macOS."""
    monkeypatch.setattr(service, "current_platform", lambda: "macos")
    monkeypatch.setenv("FAKE_LAUNCHCTL_LEAVE", "1.0")
    yield FakeTool("launchctl", tmp_path, monkeypatch)


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[FakeTool]:
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    yield FakeTool("systemctl", tmp_path, monkeypatch)


def ns(action: str, config: Path | None, platform: str, **kw: Any) -> argparse.Namespace:
    values = {"platform": platform, "system": False, "dry_run": False, "memory_max": None, "json": False, **kw}
    return argparse.Namespace(service_action=action, config=config, **values)


def target() -> str:
    return f"gui/{os.getuid()}/{LABEL}"


def agent_plist(home: Path) -> Path:
    return home / "Library" / "LaunchAgents" / f"{LABEL}.plist"


@pytest.mark.darwin_real("TestLaunchctl::test_bootstrap_print_bootout_of_a_throwaway_agent")
class TestFakeLaunchctlReproducesLaunchd:
    """The fake itself: bootout returns at once, the job lingers, an immediate bootstrap fails with 5."""

    def test_fake_immediate_bootstrap_after_bootout_fails_with_5(self, launchctl: FakeTool, home: Path,
                                                                 config: Path) -> None:
        assert service.run_service(ns("install", config, "macos")) == 0
        domain = f"gui/{os.getuid()}"
        run = [subprocess.run(["launchctl", *argv], capture_output=True, text=True, timeout=30, check=False)
               for argv in (["bootout", target()], ["print", target()], ["bootstrap", domain, str(agent_plist(home))])]
        assert [r.returncode for r in run] == [0, 0, 5]
        assert "5: Input/output error" in run[2].stderr


@pytest.mark.darwin_real("TestLaunchctl::test_bootstrap_print_bootout_of_a_throwaway_agent")
class TestLaunchdWithFakeLaunchctl:
    """install/uninstall wait for the job to leave, bootstrap is retried, status/restart/reload do what they say."""

    def test_reinstall_waits_until_the_job_left_its_domain_then_bootstraps_once(
            self, launchctl: FakeTool, home: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert service.run_service(ns("install", config, "macos")) == 0
        first_pid = launchctl.data()["services"][target()]["pid"]
        started = time.monotonic()
        assert service.run_service(ns("install", config, "macos")) == 0
        waited = time.monotonic() - started
        log = launchctl.log()
        second = log[max(i for i, call in enumerate(log) if call.startswith("bootout")):]
        assert [c.split()[0] for c in second if not c.startswith("print")] == ["bootout", "bootstrap"]
        assert sum(c.startswith("print") for c in second) >= 2  # polled while the job was leaving
        assert waited >= 1.0  # FAKE_LAUNCHCTL_LEAVE
        assert launchctl.data()["services"][target()]["pid"] != first_pid

    @pytest.mark.parametrize("code", [5, 37])
    def test_bootstrap_failing_once_is_retried(self, code: int, launchctl: FakeTool, config: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("FAKE_LAUNCHCTL_FAIL_BOOTSTRAP", "1")
        monkeypatch.setenv("FAKE_LAUNCHCTL_FAIL_CODE", str(code))
        assert service.run_service(ns("install", config, "macos")) == 0
        assert sum(c.startswith("bootstrap") for c in launchctl.log()) == 2
        assert f"error {code}" in capsys.readouterr().out
        assert launchctl.data()["services"][target()]["loaded"]

    def test_bootstrap_that_keeps_failing_is_an_error_after_the_retries(
            self, launchctl: FakeTool, config: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("FAKE_LAUNCHCTL_FAIL_BOOTSTRAP", "99")
        monkeypatch.setattr(managers, "BOOTSTRAP_RETRIES", (0.01, 0.01))
        assert service.run_service(ns("install", config, "macos")) == 3
        assert sum(c.startswith("bootstrap") for c in launchctl.log()) == 3
        err = capsys.readouterr().err
        assert "Input/output error" in err and "did not load it" in err

    def test_a_job_that_never_leaves_fails_after_exit_timeout_plus_margin(
            self, launchctl: FakeTool, config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        assert service.run_service(ns("install", config, "macos")) == 0
        monkeypatch.setenv("FAKE_LAUNCHCTL_LEAVE", "600")
        monkeypatch.setattr(managers, "BOOTOUT_MARGIN", 0.5)
        started = time.monotonic()
        with pytest.raises(ManagerError, match="still in gui/"):
            Launchd(system=False, exit_timeout=0.5, echo=lambda line: None).unload()
        assert 1.0 <= time.monotonic() - started < 10

    def test_plist_is_written_0644_whatever_the_umask(self, launchctl: FakeTool, home: Path, config: Path) -> None:
        old = os.umask(0o077)
        try:
            assert service.run_service(ns("install", config, "macos")) == 0
        finally:
            os.umask(old)
        assert stat.S_IMODE(agent_plist(home).stat().st_mode) == 0o644

    def test_status_tells_loaded_from_running(self, launchctl: FakeTool, home: Path, config: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
        assert service.run_service(ns("status", None, "macos")) == 1
        assert "loaded: no" in capsys.readouterr().out
        service.run_service(ns("install", config, "macos"))
        capsys.readouterr()
        assert service.run_service(ns("status", None, "macos", json=True)) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["loaded"] and state["running"] and state["pid"] == launchctl.data()["services"][target()]["pid"]
        data = launchctl.data()  # the daemon exits 0: KeepAlive {SuccessfulExit: false} leaves it loaded, idle
        data["services"][target()].update(pid=None, last_exit="0")
        launchctl.state.write_text(json.dumps(data))
        assert service.run_service(ns("status", None, "macos")) == 1
        out = capsys.readouterr().out
        assert "loaded: yes" in out and "running: no (not running)" in out and "last exit: 0" in out

    def test_restart_kickstarts_and_reload_sends_sighup(self, launchctl: FakeTool, config: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
        assert service.run_service(ns("restart", None, "macos")) == 1  # not installed yet
        service.run_service(ns("install", config, "macos"))
        before = launchctl.data()["services"][target()]["pid"]
        assert service.run_service(ns("restart", None, "macos")) == 0
        assert service.run_service(ns("reload", None, "macos")) == 0
        assert f"kickstart -k {target()}" in launchctl.log() and f"kill SIGHUP {target()}" in launchctl.log()
        assert launchctl.data()["services"][target()]["pid"] != before

    def test_uninstall_waits_for_the_job_to_leave_then_removes_the_plist(
            self, launchctl: FakeTool, home: Path, config: Path) -> None:
        service.run_service(ns("install", config, "macos"))
        assert service.run_service(ns("uninstall", None, "macos")) == 0
        assert not agent_plist(home).exists()
        done = subprocess.run(["launchctl", "print", target()], capture_output=True, timeout=30, check=False)
        assert done.returncode == 113  # gone from the domain by the time uninstall returned


@pytest.mark.darwin_real("TestLaunchctl::test_bootstrap_print_bootout_of_a_throwaway_agent")
class TestParseLaunchctlPrint:
    """Only the service's own lines count: a `pid` inside a nested block is not the job's pid."""

    def test_nested_blocks_are_skipped(self) -> None:
        text = (f"{target()} = {{\n\tstate = not running\n\tenvironment = {{\n\t\tpid = 12\n\t}}\n"
                "\tlast exit code = 78: EX_CONFIG\n}\n")
        state = parse_launchctl_print(text)
        assert (state.loaded, state.running, state.pid, state.last_exit) == (True, False, None, "78: EX_CONFIG")


class TestSystemdWithFakeSystemctl:
    """install, status, restart, reload and uninstall through systemctl."""

    def test_full_cycle(self, systemctl: FakeTool, home: Path, config: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
        assert service.run_service(ns("install", config, "linux")) == 0
        assert systemctl.log()[:2] == ["--user daemon-reload", f"--user enable --now {UNIT}"]
        assert service.run_service(ns("status", None, "linux", json=True)) == 0
        state = json.loads(_json_tail(capsys))
        assert state["loaded"] and state["running"] and state["last_exit"] == "never exited"
        assert service.run_service(ns("restart", None, "linux")) == 0
        assert service.run_service(ns("reload", None, "linux")) == 0
        assert f"--user restart {UNIT}" in systemctl.log() and f"--user reload {UNIT}" in systemctl.log()
        capsys.readouterr()
        service.run_service(ns("status", None, "linux", json=True))
        after = json.loads(_json_tail(capsys))
        assert after["pid"] != state["pid"] and after["last_exit"] == "signal 15"
        assert service.run_service(ns("uninstall", None, "linux")) == 0
        assert systemctl.log()[-2:] == [f"--user disable --now {UNIT}", "--user daemon-reload"]
        assert service.run_service(ns("status", None, "linux")) == 1
        assert "loaded: no" in capsys.readouterr().out


def _json_tail(capsys: pytest.CaptureFixture[str]) -> str:
    out = capsys.readouterr().out
    return out[out.index("{"):]
