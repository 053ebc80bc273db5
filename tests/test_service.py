"""`mlxsupctl service`: launchd plists, systemd units, and install/uninstall/status under a temporary HOME.

The committed examples under deploy/launchd and deploy/systemd are this renderer's output with placeholder
paths; regenerate them with `python tests/test_service.py`.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import paths
from supervisor.install.service import add_service_parser, run_service
from supervisor.install.units import (
    LABEL,
    UNIT,
    current_platform,
    daemon_program,
    render_plist,
    render_unit,
    stop_timeout,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PLIST_KEYS = {"Label", "ProgramArguments", "WorkingDirectory", "EnvironmentVariables", "RunAtLoad",
              "KeepAlive", "ThrottleInterval", "ExitTimeOut", "ProcessType", "StandardOutPath",
              "StandardErrorPath"}
UNIT_DIRECTIVES = ["Type=simple", "Restart=on-failure", "KillMode=mixed", "KillSignal=SIGTERM",
                   "ExecReload=/bin/kill -HUP $MAINPID", "Environment=PYTHONUNBUFFERED=1"]
OTHER_PLATFORM = "linux" if current_platform() == "macos" else "macos"
linux_only = pytest.mark.linux_only("installs a systemd user unit for real")
systemd_here = pytest.mark.skipif(current_platform() != "linux", reason="the service code takes this machine for "
                                  f"{current_platform()} (the macOS-shaped lane): no systemd unit to install")


def example_files() -> dict[str, bytes]:
    """The committed examples, keyed by path relative to deploy/: rendered with placeholder paths."""
    def prog(python: str) -> list[str]:
        return [python, "-m", "supervisor.cli.mlxsupd"]

    agent_cfg = Path("/Users/you/Library/Application Support/mlx-supervisor/mlxsup.toml")
    daemon_cfg = Path("/Library/Application Support/mlx-supervisor/mlxsup.toml")
    user_cfg = Path("/home/you/.config/mlx-supervisor/mlxsup.toml")
    system_cfg = Path("/etc/mlx-supervisor/mlxsup.toml")
    return {
        f"launchd/LaunchAgents/{LABEL}.plist": render_plist(
            prog("/Users/you/mlx-supervisor/.venv/bin/python"), agent_cfg,
            Path("/Users/you/Library/Logs/mlx-supervisor"), agent_cfg.parent,
            env={"TMPDIR": "/var/folders/x1/abcdefghijklmnopqrstuvwxyz0000gn/T/"}),
        f"launchd/LaunchDaemons/{LABEL}.plist": render_plist(
            prog("/opt/mlx-supervisor/.venv/bin/python"), daemon_cfg, Path("/Library/Logs/mlx-supervisor"),
            daemon_cfg.parent, system=True),
        f"systemd/user/{UNIT}": render_unit(
            prog("/home/you/mlx-supervisor/.venv/bin/python"), user_cfg, user_cfg.parent).encode(),
        f"systemd/system/{UNIT}": render_unit(prog("/opt/mlx-supervisor/.venv/bin/python"), system_cfg,
                                              system_cfg.parent, system=True).encode(),
    }


def directives(unit: str) -> list[str]:
    return [line for line in unit.splitlines() if line and not line.startswith("#")]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def plist_in(output: str) -> dict[str, Any]:
    start, end = output.index("<?xml"), output.index("</plist>") + len("</plist>")
    plist: dict[str, Any] = plistlib.loads(output[start:end].encode())
    return plist


def verify(unit: Path, user: bool, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    runtime = tmp_path / "verify-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    argv = [tool, *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary HOME, and no reachable systemd user manager wherever the suite runs."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CONFIG_HOME", "XDG_STATE_HOME", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # empty: `systemctl --user` finds no bus here
    return home


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A valid config outside HOME whose slowest job needs 200 s + 5 s to checkpoint and die."""
    path = tmp_path / "etc" / "mlxsup.toml"
    path.parent.mkdir()
    path.write_text('[jobs.fast]\nbudget = "50%"\n'
                    '[jobs.slow]\nbudget = "50%"\ncheckpoint_timeout = 200\nkill_grace = 5\n')
    return path


def ns(action: str, config: Path | None, **kw: Any) -> argparse.Namespace:
    values = {"platform": current_platform(), "system": False, "dry_run": False, "memory_max": None, **kw}
    return argparse.Namespace(service_action=action, config=config, **values)


class TestStopTimeout:
    """The stop timeout covers the slowest job's checkpoint plus kill grace and margin, never under 120 s."""

    def test_default_without_a_config(self) -> None:
        assert stop_timeout(None) == 120

    def test_slowest_job_sets_it(self, config: Path) -> None:
        from supervisor.config import load_config

        assert stop_timeout(load_config(config)) == 200 + 5 + 30

    def test_quick_jobs_keep_the_default(self, tmp_path: Path) -> None:
        from supervisor.config import load_config

        (tmp_path / "c.toml").write_text('[jobs.a]\nbudget = "50%"\n')
        assert stop_timeout(load_config(tmp_path / "c.toml")) == 120


class TestPlist:
    """Rendered plists parse with plistlib and hold every required key with absolute paths."""

    @pytest.mark.parametrize("system", [False, True], ids=["agent", "daemon"])
    def test_required_keys(self, tmp_path: Path, config: Path, system: bool) -> None:
        logs = tmp_path / "logs"
        plist = plistlib.loads(render_plist(daemon_program(), config, logs, config.parent, system=system,
                                            exit_timeout=235))
        assert set(plist) >= PLIST_KEYS
        assert plist["Label"] == LABEL
        argv = plist["ProgramArguments"]
        assert Path(argv[0]).is_absolute() and Path(argv[0]).exists()
        assert argv[1:] == ["-m", "supervisor.cli.mlxsupd", "-c", str(config)] and Path(argv[-1]).is_absolute()
        assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True
        assert plist["ExitTimeOut"] == 235 and plist["ThrottleInterval"] > 0
        assert plist["ProcessType"] == "Interactive"
        assert plist["StandardOutPath"] == str(logs / "mlxsupd.out.log")
        assert plist["StandardErrorPath"] == str(logs / "mlxsupd.err.log")
        assert plist["WorkingDirectory"] == str(config.parent)
        env = plist["EnvironmentVariables"]
        assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"].split(":")[0] == os.path.dirname(argv[0])

    def test_program_runs_mlxsupd(self, config: Path) -> None:
        plist = plistlib.loads(render_plist(daemon_program(), config, config.parent, config.parent))
        argv = plist["ProgramArguments"]
        proc = subprocess.run([*argv[:3], "--help"], capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0 and "mlxsupd" in proc.stdout

    def test_interpreter_symlink_is_kept(self) -> None:
        assert daemon_program()[0] == os.path.abspath(sys.executable)  # a venv's python is a symlink

    def test_extra_environment(self, config: Path) -> None:
        plist = plistlib.loads(render_plist(daemon_program(), config, config, config, env={"A": "b"}))
        assert plist["EnvironmentVariables"]["A"] == "b"

    def test_relative_paths_are_rejected(self, config: Path) -> None:
        with pytest.raises(ValueError, match="absolute"):
            render_plist(["python", "-m", "supervisor.cli.mlxsupd"], config, config.parent, config.parent)
        with pytest.raises(ValueError, match="absolute"):
            render_plist(daemon_program(), Path("mlxsup.toml"), config.parent, config.parent)


class TestUnit:
    """Rendered units hold the required directives and pass systemd-analyze verify."""

    @pytest.mark.parametrize(("system", "target"), [(False, "default.target"), (True, "multi-user.target")])
    def test_directives(self, config: Path, system: bool, target: str) -> None:
        unit = render_unit(daemon_program(), config, config.parent, system=system, timeout_stop=235)
        lines = directives(unit)
        for directive in [*UNIT_DIRECTIVES, "TimeoutStopSec=235", f"WantedBy={target}",
                          f"WorkingDirectory={config.parent}"]:
            assert directive in lines
        exec_start = next(line for line in lines if line.startswith("ExecStart="))
        assert shlex.split(exec_start.removeprefix("ExecStart=")) == [*daemon_program(), "-c", str(config)]
        assert "#MemoryMax=64G" in unit and not any(line.startswith("MemoryMax") for line in lines)

    @pytest.mark.parametrize(("given", "written"), [("48G", "48G"), ("80%", "80%"), ("1GiB", "1073741824")])
    def test_memory_max(self, config: Path, given: str, written: str) -> None:
        assert f"MemoryMax={written}" in directives(render_unit(daemon_program(), config, config.parent,
                                                                memory_max=given))

    def test_bad_memory_max(self, config: Path) -> None:
        with pytest.raises(ValueError, match="lots"):
            render_unit(daemon_program(), config, config.parent, memory_max="lots")

    def test_paths_with_spaces_and_specifiers_are_escaped(self, tmp_path: Path) -> None:
        config = tmp_path / "my 100% $config" / "mlxsup.toml"
        unit = render_unit(daemon_program(), config, config.parent)
        assert 'ExecStart=' in unit and '"' + str(config).replace("%", "%%").replace("$", "$$") + '"' in unit
        assert f"WorkingDirectory={str(config.parent).replace('%', '%%')}" in directives(unit)

    @pytest.mark.parametrize("system", [False, True], ids=["user", "system"])
    @pytest.mark.linux_only("runs systemd-analyze verify")
    def test_systemd_analyze_verify(self, tmp_path: Path, system: bool) -> None:
        config = tmp_path / "my 100% config" / "mlxsup.toml"
        unit = tmp_path / UNIT
        unit.write_text(render_unit(daemon_program(), config, tmp_path, system=system, memory_max="8G"))
        proc = verify(unit, user=not system, tmp_path=tmp_path)
        complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT in line]
        assert proc.returncode == 0 and not complaints, proc.stdout + proc.stderr

    @pytest.mark.linux_only("runs systemd-analyze verify")
    def test_verify_catches_a_broken_unit(self, tmp_path: Path) -> None:
        unit = tmp_path / UNIT
        unit.write_text(render_unit(daemon_program(), tmp_path / "c.toml", tmp_path).replace(
            "KillMode=mixed", "KillMode=bogus"))
        proc = verify(unit, user=True, tmp_path=tmp_path)
        assert "KillMode" in proc.stdout + proc.stderr or "kill mode" in proc.stdout + proc.stderr


class TestExamples:
    """The committed examples under deploy/ are the renderer's current output, and valid."""

    def test_examples_are_current(self) -> None:
        for rel, content in example_files().items():
            path = DEPLOY / rel
            assert path.exists() and path.read_bytes() == content, f"{rel} is stale: python {__file__}"

    @pytest.mark.parametrize("variant", ["LaunchAgents", "LaunchDaemons"])
    def test_example_plists_parse(self, variant: str) -> None:
        with (DEPLOY / "launchd" / variant / f"{LABEL}.plist").open("rb") as f:
            plist = plistlib.load(f)
        assert set(plist) >= PLIST_KEYS and plist["KeepAlive"] == {"SuccessfulExit": False}
        argv = plist["ProgramArguments"]
        paths = (argv[0], argv[-1], plist["StandardOutPath"], plist["WorkingDirectory"])
        assert all(Path(p).is_absolute() for p in paths)

    @pytest.mark.parametrize("variant", ["user", "system"])
    def test_example_units_have_the_directives(self, variant: str) -> None:
        lines = directives((DEPLOY / "systemd" / variant / UNIT).read_text())
        assert set(UNIT_DIRECTIVES) <= set(lines) and "TimeoutStopSec=120" in lines


class TestDryRun:
    """--dry-run prints the file and the manager commands, and writes nothing."""

    def test_install_dry_run_linux(self, tmp_path: Path, home: Path, config: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
        before = files_under(tmp_path)
        assert run_service(ns("install", config, dry_run=True, platform="linux")) == 0
        out = capsys.readouterr().out
        assert files_under(tmp_path) == before
        assert str(home / ".config" / "systemd" / "user" / UNIT) in out
        assert render_unit(daemon_program(), config, config.parent, timeout_stop=235) in out
        assert "systemctl --user daemon-reload\nsystemctl --user enable --now mlxsupd.service" in out

    def test_system_dry_run_linux(self, tmp_path: Path, home: Path, config: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
        before = files_under(tmp_path)
        assert run_service(ns("install", config, dry_run=True, system=True, memory_max="64G", platform="linux")) == 0
        out = capsys.readouterr().out
        assert files_under(tmp_path) == before
        assert "/etc/systemd/system/mlxsupd.service" in out and "WantedBy=multi-user.target" in out
        assert "\nMemoryMax=64G" in out
        assert "systemctl daemon-reload\nsystemctl enable --now mlxsupd.service" in out

    def test_xdg_config_home_is_honoured(self, tmp_path: Path, home: Path, config: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        assert run_service(ns("install", config, dry_run=True, platform="linux")) == 0
        assert str(tmp_path / "xdg" / "systemd" / "user" / UNIT) in capsys.readouterr().out

    def test_uninstall_and_status_dry_run_linux(self, tmp_path: Path, home: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("uninstall", None, dry_run=True, platform="linux")) == 0
        assert "systemctl --user disable --now mlxsupd.service\nsystemctl --user daemon-reload" in \
            capsys.readouterr().out
        assert run_service(ns("status", None, dry_run=True, platform="linux")) == 0
        assert "not installed" in capsys.readouterr().out

    def test_install_dry_run_macos_commands(self, tmp_path: Path, home: Path, config: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        before = files_under(tmp_path)
        assert run_service(ns("install", config, dry_run=True, platform="macos")) == 0
        out = capsys.readouterr().out
        assert files_under(tmp_path) == before
        uid, plist_path = os.getuid(), home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        assert f"launchctl bootout gui/{uid}/{LABEL}" in out
        assert f"launchctl bootstrap gui/{uid} {plist_path}" in out
        plist = plist_in(out)
        assert plist["ExitTimeOut"] == 235 and plist["ProgramArguments"][-1] == str(config)
        logs = home / "Library" / "Logs" / "mlx-supervisor"
        assert plist["StandardErrorPath"] == str(logs / "mlxsupd.err.log")

    def test_system_dry_run_macos_commands(self, home: Path, config: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("install", config, dry_run=True, platform="macos", system=True)) == 0
        out = capsys.readouterr().out
        assert f"launchctl bootstrap system /Library/LaunchDaemons/{LABEL}.plist" in out
        assert plist_in(out)["StandardOutPath"] == "/Library/Logs/mlx-supervisor/mlxsupd.out.log"
        assert run_service(ns("uninstall", None, dry_run=True, platform="macos", system=True)) == 0
        assert f"launchctl bootout system/{LABEL}" in capsys.readouterr().out

    def test_status_dry_run_macos_commands(self, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("status", None, dry_run=True, platform="macos")) == 0
        assert f"launchctl print gui/{os.getuid()}/{LABEL}" in capsys.readouterr().out


@linux_only
@systemd_here
class TestRealLinux:
    """For real on Linux: the unit is written or removed; the unreachable user manager is exit status 3."""

    def unit(self, home: Path) -> Path:
        return home / ".config" / "systemd" / "user" / UNIT

    def test_install_writes_the_unit_and_names_the_failed_command(
            self, home: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("install", config)) == 3
        out, err = capsys.readouterr()
        expected = render_unit(daemon_program(), config, config.parent, timeout_stop=235)
        assert self.unit(home).read_text() == expected
        assert f"wrote {self.unit(home)}" in out
        assert "`systemctl --user daemon-reload` failed" in err
        if shutil.which("systemctl"):
            assert "Failed to connect to bus" in err and "loginctl enable-linger" in err
        else:
            assert "systemctl not found" in err

    def test_uninstall_removes_the_unit(self, home: Path, config: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
        run_service(ns("install", config))
        capsys.readouterr()
        assert run_service(ns("uninstall", None)) == 3
        out, err = capsys.readouterr()
        assert not self.unit(home).exists() and f"removed {self.unit(home)}" in out
        assert "`systemctl --user disable --now mlxsupd.service` failed" in err
        assert run_service(ns("uninstall", None)) == 0
        assert "not installed" in capsys.readouterr().out

    def test_status_shows_the_file_and_the_manager(self, home: Path, config: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("status", None)) == 3
        assert f"{self.unit(home)} (not installed)" in capsys.readouterr().out
        run_service(ns("install", config))
        capsys.readouterr()
        assert run_service(ns("status", None)) == 3
        out, err = capsys.readouterr()
        assert f"{self.unit(home)} (installed)" in out and "systemctl --user show" in out + err


class TestRefusals:
    """Missing or bad configs, bad options and foreign platforms: status 2, and nothing written."""

    @pytest.mark.parametrize("dry_run", [True, False])
    def test_missing_config(self, tmp_path: Path, home: Path, dry_run: bool,
                            capsys: pytest.CaptureFixture[str]) -> None:
        missing = tmp_path / "nowhere" / "mlxsup.toml"
        assert run_service(ns("install", missing, dry_run=dry_run)) == 2
        err = capsys.readouterr().err
        assert str(missing) in err and "deploy/mlxsup.example.toml" in err
        assert files_under(home) == {}

    def test_default_config_path_when_none(self, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("install", None, dry_run=True)) == 2
        assert str(paths.default_config_path()) in capsys.readouterr().err

    def test_invalid_config(self, tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        bad = tmp_path / "bad.toml"
        bad.write_text("[jobs.a]\nbudgit = 1\n")
        assert run_service(ns("install", bad)) == 2
        assert "budgit" in capsys.readouterr().err and files_under(home) == {}

    def test_bad_memory_max(self, home: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns("install", config, memory_max="lots", platform="linux", dry_run=True)) == 2
        assert "--memory-max 'lots'" in capsys.readouterr().err and files_under(home) == {}

    @pytest.mark.parametrize("action", ["install", "uninstall", "status"])
    def test_foreign_platform_needs_dry_run(self, home: Path, config: Path, action: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        assert run_service(ns(action, config, platform=OTHER_PLATFORM)) == 2
        assert "--dry-run" in capsys.readouterr().err and files_under(home) == {}


class TestCommandLine:
    """The parser: `service` under a parent parser owning -c, and the `python -m supervisor.install.service` entry."""

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="mlxsupctl")
        parser.add_argument("-c", "--config", type=Path, default=None)
        add_service_parser(parser.add_subparsers(dest="command"))
        return parser

    def test_parent_config_and_defaults(self, config: Path) -> None:
        args = self.parser().parse_args(["-c", str(config), "service", "install", "--dry-run"])
        assert args.func is run_service and args.config == config and args.service_action == "install"
        assert args.dry_run and not args.system and args.memory_max is None
        assert args.platform == current_platform()

    def test_options_after_the_action(self, config: Path) -> None:
        argv = ["service", "status", "--platform", "macos", "--system", "-c", str(config)]
        args = self.parser().parse_args(argv)
        assert (args.platform, args.system, args.config) == ("macos", True, config)
        assert self.parser().parse_args(["service", "uninstall"]).config is None

    def test_unknown_action_is_a_usage_error(self) -> None:
        with pytest.raises(SystemExit) as exc:
            self.parser().parse_args(["service", "bounce"])
        assert exc.value.code == 2

    def test_module_entry_point(self, home: Path, config: Path) -> None:
        argv = [sys.executable, "-m", "supervisor.install.service", "install", "--dry-run", "--platform", "macos",
                "-c", str(config)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "HOME": str(home)})
        assert proc.returncode == 0, proc.stderr
        assert plist_in(proc.stdout)["ProgramArguments"][0] == os.path.abspath(sys.executable)


if __name__ == "__main__":
    for rel, content in example_files().items():
        (DEPLOY / rel).parent.mkdir(parents=True, exist_ok=True)
        (DEPLOY / rel).write_bytes(content)
        print(f"wrote deploy/{rel}")
