"""mlxsupctl's command line: --json in either place, and a clear error (not a traceback) for a missing event
endpoint, in one-shot use and inside the interactive shell."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.mlxsupctl import build_parser
from supervisor.control.commands import REGISTRY
from tests.test_daemon import Daemon, free_port


class TestJsonAnywhere:
    """README: every command takes --json; before or after the command name."""

    @pytest.mark.parametrize("name", sorted(REGISTRY))
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


@pytest.mark.slow
class TestEventEndpointMissing:
    """`tail -f JOB telemetry` over -s tcp:// without --events: exit 2 naming --events; the shell lives on."""

    def test_one_shot_exits_2_naming_events(self, loopback_daemon: str) -> None:
        done = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-s", loopback_daemon, "--timeout",
                               "3", "tail", "-f", "j", "telemetry", "--seconds", "1"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert "--events" in done.stderr and "Traceback" not in done.stderr

    def test_shell_reports_it_and_keeps_the_session(self, loopback_daemon: str) -> None:
        done = subprocess.run([sys.executable, "-m", "supervisor.cli.mlxsupctl", "-s", loopback_daemon, "--timeout",
                               "3"], input="tail -f j telemetry --seconds 1\nversion\nquit\n",
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "--events" in done.stdout and "Traceback" not in done.stdout + done.stderr
        assert "mlxsupd" in done.stdout.split("--events", 1)[1]  # `version` answered after the error
