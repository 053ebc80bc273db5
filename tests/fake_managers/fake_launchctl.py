"""A fake ``launchctl`` (installed on PATH as ``launchctl`` by tests) that behaves as launchd is documented to.

State lives in the JSON file named by FAKE_LAUNCHCTL_STATE; every invocation is appended to FAKE_LAUNCHCTL_CALLS.

- ``bootout TARGET`` returns 0 at once, but the job stays in its domain (``print`` still succeeds, state running)
  for FAKE_LAUNCHCTL_LEAVE seconds (default 1.0): launchd tears the job down after bootout has returned. Not
  loaded: "Boot-out failed: 3: No such process", exit 3.
- ``bootstrap DOMAIN PLIST`` while the job is still leaving or loaded: "Bootstrap failed: 5: Input/output error",
  exit 5. FAKE_LAUNCHCTL_FAIL_BOOTSTRAP=N makes the first N bootstraps fail that way regardless, or with
  FAKE_LAUNCHCTL_FAIL_CODE=37 as "Bootstrap failed: 37: Operation already in progress" (exit 37), the other error
  launchd gives while the previous instance is leaving. A plist that does not parse or lacks the label: exit 5
  too. Else the job is loaded and running with a new pid.
- ``print DOMAIN/LABEL``: the service block (state, pid, last exit code), exit 0; unknown service: exit 113.
- ``kickstart -k TARGET``: kills and restarts (new pid, last terminating signal SIGTERM). ``kill SIG TARGET``:
  exit 3 when not running. Unknown service: exit 113.
"""

from __future__ import annotations

import json
import os
import plistlib
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_LAUNCHCTL_STATE"])
BOOTSTRAP_ERRORS = {5: "Input/output error", 37: "Operation already in progress"}
LEAVE = float(os.environ.get("FAKE_LAUNCHCTL_LEAVE", "1.0"))
NOT_FOUND = 113


def load() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {"services": {}, "next_pid": 4000,
                                                                  "bootstrap_failures": 0}


def save(state: dict) -> None:
    STATE.write_text(json.dumps(state))


def fail(code: int, message: str) -> int:
    print(message, file=sys.stderr)
    return code


def present(service: dict | None) -> bool:
    return service is not None and (service["loaded"] or service.get("leaving_until", 0) > time.time())


def print_service(target: str, service: dict) -> int:
    running = service["pid"] is not None
    lines = [f"{target} = {{", "\tactive count = 1", f"\tpath = {service['path']}",
             f"\tstate = {'running' if running else 'not running'}", "", "\tprogram = /usr/bin/python3",
             "\targuments = {", "\t\tpython3", "\t}", "", "\tenvironment = {", "\t\tpid = 1", "\t}", "",
             f"\truns = {service['runs']}"]
    if running:
        lines.append(f"\tpid = {service['pid']}")
    lines.append(f"\tlast exit code = {service['last_exit']}")
    if service.get("last_signal"):
        lines.append(f"\tlast terminating signal = {service['last_signal']}")
    lines.append("}")
    print("\n".join(lines))
    return 0


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_LAUNCHCTL_CALLS"], "a") as log:
        log.write(" ".join(argv) + "\n")
    state = load()
    services: dict = state["services"]
    verb, args = argv[0], argv[1:]
    if verb == "bootstrap":
        domain, path = args
        try:
            label = plistlib.loads(Path(path).read_bytes())["Label"]
        except (OSError, plistlib.InvalidFileException, KeyError):
            return fail(5, "Bootstrap failed: 5: Input/output error")
        target = f"{domain}/{label}"
        forced = state["bootstrap_failures"] < int(os.environ.get("FAKE_LAUNCHCTL_FAIL_BOOTSTRAP", "0"))
        if forced or present(services.get(target)):
            state["bootstrap_failures"] += 1
            save(state)
            code = int(os.environ.get("FAKE_LAUNCHCTL_FAIL_CODE", "5")) if forced else 5
            return fail(code, f"Bootstrap failed: {code}: {BOOTSTRAP_ERRORS[code]}")
        state["next_pid"] += 1
        services[target] = {"loaded": True, "path": path, "pid": state["next_pid"], "runs": 1,
                            "last_exit": "(never exited)"}
    elif verb == "bootout":
        service = services.get(args[0])
        if service is None or not service["loaded"]:
            return fail(3, "Boot-out failed: 3: No such process")
        service.update(loaded=False, leaving_until=time.time() + LEAVE)
    elif verb == "print":
        service = services.get(args[0])
        if not present(service):
            return fail(NOT_FOUND, f'Could not find service "{args[0].rpartition("/")[2]}" in domain for port')
        return print_service(args[0], service)
    elif verb in ("kickstart", "kill"):
        service = services.get(args[-1])
        if service is None or not service["loaded"]:
            return fail(NOT_FOUND, "Could not find service")
        if verb == "kill" and service["pid"] is None:
            return fail(3, "No such process")
        if verb == "kickstart" and "-k" in args:
            state["next_pid"] += 1
            service.update(pid=state["next_pid"], runs=service["runs"] + 1, last_exit="(never exited)",
                           last_signal="Terminated: 15")
    else:
        return fail(64, f"Unrecognized subcommand: {verb}")
    save(state)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
