"""A fake ``systemctl`` (installed on PATH by tests): a user or system manager holding one unit's state.

State in FAKE_SYSTEMCTL_STATE (JSON), invocations appended to FAKE_SYSTEMCTL_CALLS. ``daemon-reload`` reads which
unit files exist (under $XDG_CONFIG_HOME or ~/.config/systemd/user for --user); ``enable --now`` starts the unit
(a new MainPID); ``disable --now`` stops it; ``restart`` gives a new MainPID and records the old one's exit by
SIGTERM; ``reload`` fails unless running; ``show UNIT --property=...`` prints Key=value lines, LoadState=not-found
for a unit whose file is unknown. Unit names other than the one given are "not found" (exit 5).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STATE = Path(os.environ["FAKE_SYSTEMCTL_STATE"])


def unit_dir(user: bool) -> Path:
    if not user:
        return Path("/etc/systemd/system")
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path(os.environ["HOME"]) / ".config")
    return home / "systemd" / "user"


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_SYSTEMCTL_CALLS"], "a") as log:
        log.write(" ".join(argv) + "\n")
    user = "--user" in argv
    words = [a for a in argv if not a.startswith("--")]
    verb, units = words[0], words[1:]
    state = json.loads(STATE.read_text()) if STATE.exists() else {"known": [], "units": {}, "next_pid": 7000}
    if verb == "daemon-reload":
        state["known"] = sorted(p.name for p in unit_dir(user).glob("*.service"))
    elif units and units[0] not in state["known"] and verb != "show":
        print(f"Failed to {verb} {units[0]}: Unit {units[0]} not found.", file=sys.stderr)
        return 5
    elif verb in ("enable", "restart"):
        unit = state["units"].setdefault(units[0], {"pid": 0, "code": 0, "status": 0})
        if verb == "restart" and unit["pid"]:
            unit.update(code=2, status=15)  # the previous main process was killed by SIGTERM
        state["next_pid"] += 1
        unit["pid"] = state["next_pid"]
    elif verb == "disable":
        state["units"].setdefault(units[0], {"pid": 0, "code": 0, "status": 0}).update(pid=0, code=1, status=0)
    elif verb == "reload":
        if not state["units"].get(units[0], {}).get("pid"):
            print(f"Job for {units[0]} failed: unit not active.", file=sys.stderr)
            return 1
    elif verb == "show":
        unit = state["units"].get(units[0], {"pid": 0, "code": 0, "status": 0})
        loaded = units[0] in state["known"]
        running = bool(unit["pid"])
        print(f"LoadState={'loaded' if loaded else 'not-found'}\nActiveState={'active' if running else 'inactive'}"
              f"\nSubState={'running' if running else 'dead'}\nMainPID={unit['pid']}\nExecMainCode={unit['code']}"
              f"\nExecMainStatus={unit['status']}")
    else:
        print(f"Unknown command verb {verb}.", file=sys.stderr)
        return 1
    STATE.write_text(json.dumps(state))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
