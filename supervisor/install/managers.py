"""Driving launchd (``launchctl``) and systemd (``systemctl``): load, unload, restart, reload, and their state.

launchd's quirks are handled here: ``launchctl bootout`` returns before the job has left its domain, and a
``bootstrap`` issued meanwhile fails with "5: Input/output error" (37 in launchd's log). So ``unload`` waits until
``launchctl print DOMAIN/LABEL`` fails, bounded by the job's exit timeout plus a margin, and ``load`` retries a
bootstrap that fails with 5 or 37. A status tells loaded from running: a job that exited 0 under
``KeepAlive {SuccessfulExit: false}`` stays loaded without a process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

LABEL = "com.mlx-supervisor.mlxsupd"
UNIT = "mlxsupd.service"
BOOTOUT_MARGIN = 15.0  # s: on top of ExitTimeOut, for launchd to tear the job down
BOOTSTRAP_RETRIES = (0.5, 1.0, 2.0, 4.0)  # s between attempts after an error 5 or 37
RETRIED_BOOTSTRAP_ERRORS = (5, 37)  # EIO while the old instance is leaving; EALREADY ("in progress")
POLL_INTERVAL = 0.2  # s between `launchctl print` checks while a job leaves its domain
COMMAND_TIMEOUT = 60.0  # s for one launchctl/systemctl call

Runner = Callable[[list[str], float], tuple[int | None, str]]


@dataclass(frozen=True)
class ServiceState:
    """What the service manager says about the service."""

    loaded: bool
    running: bool
    pid: int | None
    last_exit: str | None  # "0", "1", "signal 15", "never exited"; None when unknown
    state: str  # the manager's own word: launchd's `state`, systemd's ActiveState/SubState

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_command(argv: list[str], timeout: float) -> tuple[int | None, str]:
    """Run one manager command; (exit status or None when it could not run, its combined output)."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return None, f"{argv[0]} not found: is this machine's service manager installed?"
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return None, str(exc)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


class ManagerError(RuntimeError):
    """A manager command failed; ``argv`` and ``output`` say which and why."""

    def __init__(self, argv: list[str], what: str, output: str = "") -> None:
        super().__init__(f"`{shlex.join(argv)}` {what}")
        self.argv, self.output = argv, output


class Manager(Protocol):
    """One service manager, for the per-user or the system service."""

    name: str

    def plan(self, action: str, path: str) -> list[str]:
        """The commands ``action`` runs, as lines for --dry-run."""

    def load(self, path: str) -> None: ...
    def unload(self) -> None: ...
    def restart(self) -> None: ...
    def reload(self) -> None: ...
    def state(self) -> ServiceState: ...


class Launchd:
    """``launchctl`` for the LaunchAgent (``gui/UID``) or the LaunchDaemon (``system``)."""

    name = "launchd"

    def __init__(self, system: bool, exit_timeout: float, run: Runner = run_command,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 echo: Callable[[str], None] = print) -> None:
        self.domain = "system" if system else f"gui/{os.getuid()}"
        self.target = f"{self.domain}/{LABEL}"
        self.leave_timeout = exit_timeout + BOOTOUT_MARGIN
        self._run, self._sleep, self._clock, self._echo = run, sleep, clock, echo

    def plan(self, action: str, path: str) -> list[str]:
        bootout = [f"launchctl bootout {self.target}    # may fail harmlessly: not loaded",
                   f"launchctl print {self.target}    # repeated until it fails: the job has left its domain "
                   f"(at most {self.leave_timeout:.0f} s)"]
        bootstrap = f"launchctl bootstrap {self.domain} {shlex.quote(path)}    # retried on errors 5 and 37"
        return {"install": [*bootout, bootstrap], "uninstall": bootout,
                "restart": [f"launchctl kickstart -k {self.target}"],
                "reload": [f"launchctl kill SIGHUP {self.target}"],
                "status": [f"launchctl print {self.target}"]}[action]

    def _call(self, argv: list[str], echo: bool = True) -> tuple[int | None, str]:
        if echo:
            self._echo(f"$ {shlex.join(argv)}")
        return self._run(argv, COMMAND_TIMEOUT)

    def unload(self) -> None:
        """bootout, then wait until the job has left its domain (bootout does not wait for that)."""
        status, output = self._call(["launchctl", "bootout", self.target])
        if status is None:
            raise ManagerError(["launchctl", "bootout", self.target], "could not run", output)
        deadline = self._clock() + self.leave_timeout
        while self._call(["launchctl", "print", self.target], echo=False)[0] == 0:
            if self._clock() >= deadline:
                raise ManagerError(["launchctl", "bootout", self.target],
                                   f"returned, but the job was still in {self.domain} after "
                                   f"{self.leave_timeout:.0f} s", output)
            self._sleep(POLL_INTERVAL)

    def load(self, path: str) -> None:
        """bootstrap, retried while launchd still holds the previous instance (errors 5 and 37)."""
        argv = ["launchctl", "bootstrap", self.domain, path]
        for delay in (*BOOTSTRAP_RETRIES, None):
            status, output = self._call(argv)
            if status == 0:
                return
            if status not in RETRIED_BOOTSTRAP_ERRORS or delay is None:
                why = f"exit {status}" if status is not None else "could not run"
                raise ManagerError(argv, f"failed ({why}): {output}", output)
            self._echo(f"(error {status}: the previous instance is still leaving; retrying in {delay:g} s)")
            self._sleep(delay)

    def restart(self) -> None:
        self._checked(["launchctl", "kickstart", "-k", self.target])

    def reload(self) -> None:
        self._checked(["launchctl", "kill", "SIGHUP", self.target])

    def _checked(self, argv: list[str]) -> None:
        status, output = self._call(argv)
        if status != 0:
            raise ManagerError(argv, f"failed ({'exit ' + str(status) if status is not None else 'could not run'})"
                               f": {output}", output)

    def state(self) -> ServiceState:
        argv = ["launchctl", "print", self.target]
        status, output = self._run(argv, COMMAND_TIMEOUT)
        if status is None:
            raise ManagerError(argv, "could not run", output)
        if status != 0:  # 113: "Could not find service ... in domain"
            return ServiceState(False, False, None, None, "not loaded")
        return parse_launchctl_print(output)


def parse_launchctl_print(text: str) -> ServiceState:
    """The service's own ``key = value`` lines of ``launchctl print DOMAIN/LABEL`` (nested blocks skipped)."""
    fields: dict[str, str] = {}
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if line == "}":
            depth -= 1
            continue
        key, sep, value = line.partition(" = ")
        if sep and depth == 1:
            fields.setdefault(key, value.rstrip("{").strip())
        if line.endswith("{"):
            depth += 1
    state = fields.get("state", "unknown")
    pid = int(fields["pid"]) if fields.get("pid", "").isdigit() else None
    last_exit = fields.get("last exit code")
    if last_exit and "never exited" in last_exit:
        last_exit = "never exited"
    signal = fields.get("last terminating signal")
    if signal:
        last_exit = f"signal: {signal}"
    return ServiceState(True, state == "running" and pid is not None, pid, last_exit, state)


class Systemd:
    """``systemctl`` (``--user`` for the user unit)."""

    name = "systemd"

    def __init__(self, system: bool, run: Runner = run_command, echo: Callable[[str], None] = print) -> None:
        self.ctl = ["systemctl"] if system else ["systemctl", "--user"]
        self._run, self._echo = run, echo

    def plan(self, action: str, path: str) -> list[str]:
        ctl = shlex.join(self.ctl)
        return {"install": [f"{ctl} daemon-reload", f"{ctl} enable --now {UNIT}"],
                "uninstall": [f"{ctl} disable --now {UNIT}", f"{ctl} daemon-reload"],
                "restart": [f"{ctl} restart {UNIT}"], "reload": [f"{ctl} reload {UNIT}"],
                "status": [f"{ctl} show {UNIT} --property={','.join(_SHOW)}"]}[action]

    def _checked(self, *args: str) -> None:
        argv = [*self.ctl, *args]
        self._echo(f"$ {shlex.join(argv)}")
        status, output = self._run(argv, COMMAND_TIMEOUT)
        if status != 0:
            why = f"exit {status}" if status is not None else "could not run"
            raise ManagerError(argv, f"failed ({why}): {output}", output)
        if output:
            self._echo(output)

    def load(self, path: str) -> None:
        self._checked("daemon-reload")
        self._checked("enable", "--now", UNIT)

    def unload(self) -> None:
        self._checked("disable", "--now", UNIT)

    def forget(self) -> None:
        """After the unit file is removed."""
        self._checked("daemon-reload")

    def restart(self) -> None:
        self._checked("restart", UNIT)

    def reload(self) -> None:
        self._checked("reload", UNIT)

    def state(self) -> ServiceState:
        argv = [*self.ctl, "show", UNIT, f"--property={','.join(_SHOW)}"]
        status, output = self._run(argv, COMMAND_TIMEOUT)
        if status != 0:
            raise ManagerError(argv, f"failed ({'exit ' + str(status) if status is not None else 'could not run'})"
                               f": {output}", output)
        return parse_systemctl_show(output)


_SHOW = ("LoadState", "ActiveState", "SubState", "MainPID", "ExecMainCode", "ExecMainStatus")
_CLD = {1: "", 2: "signal ", 3: "signal (core dumped) "}  # ExecMainCode is the CLD_* code of waitid


def parse_systemctl_show(text: str) -> ServiceState:
    """``systemctl show UNIT --property=...`` lines (``Key=value``)."""
    fields = dict(line.partition("=")[::2] for line in text.splitlines() if "=" in line)
    loaded = fields.get("LoadState") == "loaded"
    active, sub = fields.get("ActiveState", "unknown"), fields.get("SubState", "unknown")
    pid = int(fields.get("MainPID") or 0) or None
    code = int(fields.get("ExecMainCode") or 0)
    last_exit = f"{_CLD[code]}{fields.get('ExecMainStatus', '?')}".strip() if code in _CLD else "never exited"
    return ServiceState(loaded, active == "active" and sub == "running", pid, last_exit, f"{active}/{sub}")


def manager_for(platform: str, system: bool, exit_timeout: float, echo: Callable[[str], None] = print,
                run: Runner = run_command) -> Launchd | Systemd:
    """The service manager of ``platform`` (``macos`` or ``linux``)."""
    if platform == "macos":
        return Launchd(system, exit_timeout, run=run, echo=echo)
    return Systemd(system, run=run, echo=echo)


def hint(argv: list[str], output: str) -> str:
    """A sentence telling what to do about a manager's failure, or ""."""
    if "Failed to connect to bus" in output and "--user" in argv:
        return ("no systemd user manager is reachable from this session (ssh/su/container?): log in "
                "normally, or `loginctl enable-linger $USER`, or install the system unit with --system")
    if any(s in output for s in ("Failed to connect to bus", "Permission denied", "Operation not permitted")):
        return "the system service manager needs root: run with sudo"
    if "Domain does not support" in output:
        return "no GUI session for this user (ssh?): log in at the Mac, or use --system (LaunchDaemon)"
    if "Input/output error" in output:
        return "already loaded, or the plist is invalid: check `plutil -lint FILE` and the err.log"
    if "not found" in output and argv:
        return f"{argv[0]} is not installed here: run mlxsupd in the foreground instead"
    return ""


def report(error: ManagerError) -> None:
    """Print a manager error with its hint on stderr."""
    tip = hint(error.argv, error.output)
    print(f"mlxsupctl service: {error}" + (f"\n  hint: {tip}" if tip else ""), file=sys.stderr)

