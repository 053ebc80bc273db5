"""mlxsupctl's command line: --json in either place, and a clear error (not a traceback) for a missing event
endpoint, in one-shot use and inside the interactive shell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.mlxsupctl import build_parser
from supervisor.control.commands import CLI_COMMANDS, REGISTRY
from tests.test_daemon import Daemon, free_port


class TestJsonAnywhere:
    """docs/running.md: every command takes --json; before or after the command name."""

    @pytest.mark.parametrize("name", sorted(CLI_COMMANDS))
    def test_after_the_command(self, name: str) -> None:
        positional = {"budget": ["j"], "signal": ["j", "TERM"]}.get(name)
        if positional is None:
            positional = ["j"] if REGISTRY[name].wire.get("job", (str, False))[1] else []
        assert build_parser().parse_args([name, *positional, "--json"]).json is True
        assert build_parser().parse_args(["--json", name, *positional]).json is True
        assert build_parser().parse_args([name, *positional]).json is False


@pytest.fixture
def loopback_daemon(spawn: Any, config_file: Any, tmp_path: Path) -> Any:
    """A daemon with one stopped job, reachable over plain loopback TCP (control only, no event endpoint)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    path = config_file({"j": {"autostart": False}}, control={"tcp": endpoint, "allow_plaintext_loopback": True})
    daemon = Daemon(spawn, path, tmp_path)
    yield endpoint
    daemon.stop()


def ctl(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-s", endpoint, "--timeout", "3", *args],
                          input=stdin, capture_output=True, text=True, timeout=30)


@pytest.mark.slow
class TestOverLoopbackTcp:
    """`tail -f JOB telemetry` over -s tcp:// without --events: exit 2 naming --events; the shell lives on.
    `audit` shows the trail, `version` the counters."""

    def test_audit_and_counters(self, loopback_daemon: str) -> None:
        assert ctl(loopback_daemon, "reread").returncode == 0
        records = json.loads(ctl(loopback_daemon, "audit", "-n", "1", "--json").stdout)["records"]
        assert [(r["client"], r["command"], r["role"]) for r in records] == [("loopback", "reread", "admin")]
        text = ctl(loopback_daemon, "audit").stdout
        assert "loopback" in text and "reread" in text
        control = json.loads(ctl(loopback_daemon, "version", "--json").stdout)["control"]
        assert control["audit_records"] == 1 and control["audit_write_failures"] == 0

    def test_one_shot_exits_2_naming_events(self, loopback_daemon: str) -> None:
        done = ctl(loopback_daemon, "tail", "-f", "j", "telemetry", "--seconds", "1")
        assert done.returncode == 2, done.stderr
        assert "--events" in done.stderr and "Traceback" not in done.stderr

    def test_shell_reports_it_and_keeps_the_session(self, loopback_daemon: str) -> None:
        done = ctl(loopback_daemon, stdin="tail -f j telemetry --seconds 1\nversion\nquit\n")
        assert done.returncode == 0, done.stderr
        assert "--events" in done.stdout and "Traceback" not in done.stdout + done.stderr
        assert "mlxsupd" in done.stdout.split("--events", 1)[1]  # `version` answered after the error
