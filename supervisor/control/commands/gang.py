"""``gang-sync``: daemon to daemon, a gang follower's state exchange with its leader (``supervisor.core.gang``).

A follower daemon sends its state every ``gang.sync_interval`` over the CURVE-authenticated control channel; the
leader answers with its own. Both carry the generation; the leader's ``epoch`` (one per leader process) tells
generations of an earlier leader process apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from protocol.control import ControlError
from supervisor.control.access import Role
from supervisor.control.commands.base import ControlCommand, job_of
from supervisor.core.gang import Outcome

if TYPE_CHECKING:
    from supervisor.daemon.server import DaemonService


class GangSync(ControlCommand):
    name = "gang-sync"
    help = "daemon to daemon: a gang follower reports its ranks to the leader and learns the generation to run"
    role = Role.OPERATE  # a follower daemon's key needs operate: its reports can start and stop the gang
    # A state exchange several times a second: what it causes is in the job's history (gang_join, spawn, exit).
    changes = False
    cli = False
    wire: ClassVar[dict[str, tuple[type, bool]]] = {
        "job": (str, True), "host": (str, True), "layout": (str, True), "epoch": (str, True), "gen": (int, True),
        "alive": (int, True), "want": (bool, True), "outcome": (dict, False), "ranks": (list, False),
        "leaving": (bool, False),
    }

    def handle(self, daemon: DaemonService, args: dict[str, Any], client: str = "local") -> Any:
        job = job_of(daemon, args["job"])
        if job.layout is None or not job.lifecycle.peers:
            raise ControlError(ControlError.BAD_STATE, f"job {job.name} is not a gang led by this daemon")
        if args["layout"] != job.layout.fingerprint():
            raise ControlError(ControlError.BAD_VALUE, f"job {job.name}: the gang's hosts, ranks or port differ "
                                                       f"between the configs (leader {job.layout.fingerprint()})")
        same = args["epoch"] == daemon.epoch  # generations of an earlier leader process are other ones
        try:
            outcome = Outcome.from_wire(args["outcome"]) if same and args.get("outcome") else None
        except ValueError as exc:
            raise ControlError(ControlError.BAD_VALUE, str(exc)) from None
        ranks = tuple(r for r in args.get("ranks", []) if isinstance(r, dict))[:64]
        reply = job.on_peer_sync(daemon.daemon.system.now(), args["host"], args["gen"] if same else 0,
                                 max(0, args["alive"]), args["want"], outcome, ranks, bool(args.get("leaving")))
        if "error" in reply:
            raise ControlError(ControlError.BAD_VALUE, str(reply["error"]))
        return {**reply, "epoch": daemon.epoch}
