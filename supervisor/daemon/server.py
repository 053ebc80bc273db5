"""``mlxsupd -c CONFIG``: the long-running daemon over every configured job, with its control plane."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import structlog

from protocol.control import ControlError
from supervisor.config import Config, ConfigError, GangConfig, load_config
from supervisor.control.access import read_authorized_keys
from supervisor.control.audit import AuditTrail
from supervisor.control.server import ControlServer
from supervisor.core.events import Refused
from supervisor.core.sizes import parse_bytes
from supervisor.core.states import TERMINAL_STATES
from supervisor.daemon.ganglink import GangLink, make_link
from supervisor.daemon.loop import Daemon, SocketHandlers
from supervisor.daemon.system import System

log = structlog.get_logger("mlxsupd")


def config_diff(old: Config, new: Config) -> dict[str, list[str]]:
    """Jobs added, removed and changed from ``old`` to ``new``."""
    before, after = old.jobs, new.jobs
    return {
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changed": sorted(n for n in set(before) & set(after) if before[n] != after[n]),
    }


class DaemonService:
    """The daemon plus what only the service mode has: control socket, events, config reload.

    It is the daemon loop's hooks: the loop polls its control sockets, hands it every job event to publish,
    tells it about SIGHUP, and lets it drop removed jobs once their workers are gone.
    """

    def __init__(self, config: Config, system: System | None = None, job_names: list[str] | None = None,
                 one_shot: bool = False) -> None:
        self.config = config
        self.pending: Config | None = None
        self.removing: set[str] = set()
        self.epoch = secrets.token_hex(4)  # tells this process's gang generations from an earlier one's
        # Gang followers: job -> (its gang config, its link to the leader; None when its keys cannot be read).
        self.links: dict[str, tuple[GangConfig, GangLink | None]] = {}
        self.daemon = Daemon(config, job_names, system=system, one_shot=one_shot, hooks=self)
        audit = AuditTrail(config.state_dir / "audit.jsonl", parse_bytes(config.daemon.log_max_bytes),
                           config.daemon.log_keep)
        try:
            self.control = ControlServer(self, self.daemon.context, self.daemon.run_dir, config.daemon.control,
                                         lambda value: config.resolve(value, config.path.parent), audit)
        except BaseException:
            self.daemon.close()
            raise

    # -- the loop's hooks -----------------------------------------------------------------------------

    def sockets(self) -> SocketHandlers:
        return self.control.sockets()

    def publish(self, job: str, kind: str, data: dict[str, Any]) -> None:
        self.control.publish(job, kind, data)

    def wants(self, job: str, kind: str) -> bool:
        return self.control.wants(job, kind)

    def on_reload(self, now: float) -> None:
        log.info("sighup", action="reread and update")
        try:
            self.reread()
            self.update()
        except (ControlError, ConfigError) as exc:  # a bad config on SIGHUP keeps the running one
            log.error("reload_failed", error=str(exc))
            self.pending = None

    def on_turn(self, daemon: Daemon, now: float) -> None:
        self._gang_links(daemon, now)
        for name in list(self.removing):
            job = daemon.jobs.get(name)
            if job is None or (not job.busy and job.state in TERMINAL_STATES):
                if job is not None:
                    job.recorder.close()
                    # Its workers' socket identities went with them: nothing may keep the removed job alive.
                    daemon.by_identity = {k: v for k, v in daemon.by_identity.items() if v is not job}
                daemon.jobs.pop(name, None)
                self.removing.discard(name)
                log.info("job_removed", job=name)

    def _gang_links(self, daemon: Daemon, now: float) -> None:
        """Each gang follower job talks to its leader; a link follows its job's config (and goes with it)."""
        for name, (gang, link) in list(self.links.items()):
            job = daemon.jobs.get(name)
            if job is None or not job.lifecycle.settings.follower or gang != job.config.gang:
                if link is not None:
                    link.close()
                del self.links[name]
        for name, job in daemon.jobs.items():
            if job.lifecycle.settings.follower and name not in self.links:
                resolve = self._resolve
                self.links[name] = (job.config.gang, make_link(job, daemon.context, resolve))
            link = self.links[name][1] if name in self.links else None
            if link is not None:
                link.turn(now)

    def _resolve(self, value: str) -> Path:
        return self.config.resolve(value, self.config.path.parent)

    # -- config reload --------------------------------------------------------------------------------

    def reread(self) -> dict[str, list[str]]:
        """Load the config file again; report what an update would change."""
        try:
            new = load_config(self.config.path, total_memory=self.daemon.total_memory)
            control = new.daemon.control
            if control.server_key and control.authorized_keys:  # a bad allow-list refuses the whole reread
                read_authorized_keys(new.resolve(control.authorized_keys, new.path.parent))
        except ConfigError as exc:
            raise ControlError(ControlError.BAD_VALUE, f"config not reloaded: {exc}") from None
        self.pending = new
        return config_diff(self.config, new)

    def update(self, client: str = "local") -> dict[str, list[str]]:
        """Apply the last reread (for ``client``): add, remove (after a checkpoint) and reconfigure jobs, reload
        the allow-list of keys.

        A job removed and added back before its worker has exited keeps its entry (one worker per checkpoint
        directory): its removal is cancelled and the new config applies at its next start.
        """
        new = self.pending
        changes = self.reread() if new is None else config_diff(self.config, new)
        new = self.pending
        assert new is not None
        try:
            self.control.reload_keys(new.daemon.control, lambda v: new.resolve(v, new.path.parent))
        except ConfigError as exc:
            raise ControlError(ControlError.BAD_VALUE, f"authorized keys not reloaded: {exc}") from None
        now = self.daemon.system.now()
        self.config = self.daemon.config = new
        for name in changes["added"]:
            self._add(name, now, client)
        for name in changes["removed"]:
            self.removing.add(name)
            self.daemon.jobs[name].stop(now, "removed from config", client=client)
        for name in changes["changed"]:
            self.daemon.jobs[name].reconfigure(new.jobs[name], new.jobs[name].limits(self.daemon.total_memory),
                                               new.layout(name))
        self.pending = None
        log.info("config_updated", **changes)
        return changes

    def _add(self, name: str, now: float, client: str) -> None:
        config = self.config.jobs[name]
        job = self.daemon.jobs.get(name)
        if job is None:
            job = self.daemon.add_job(name)
        else:  # removed earlier, still winding down: keep the entry, take the new config
            self.removing.discard(name)
            job.reconfigure(config, config.limits(self.daemon.total_memory), self.config.layout(name))
        if config.autostart and not self.daemon.stopping:
            try:
                job.restart(now, client) if job.busy else job.start(now, "added by update", client)
            except Refused as exc:
                log.warning("job_not_started", job=name, reason=str(exc))

    # -- lifetime -------------------------------------------------------------------------------------

    def serve(self) -> int:
        daemon = self.daemon
        daemon.install_signal_handlers()
        now = daemon.system.now()
        log.info("daemon_started", config=str(self.config.path), jobs=sorted(daemon.jobs),
                 control=self.control.endpoint, events=self.control.events_endpoint)
        for job in daemon.jobs.values():
            if job.config.autostart:
                job.start(now, "autostart", client="daemon")
            elif was_active(job.history.events):
                job.start(now, "resume: the job was running when the daemon stopped", client="daemon")
        try:
            return daemon.run()
        finally:
            self.close()
            log.info("daemon_stopped")

    def close(self) -> None:
        for _, link in self.links.values():
            if link is not None:
                link.farewell(self.daemon.system.now())  # bounded: the leader hears of it instead of timing out
                link.close()
        self.control.close()
        self.daemon.close()


def was_active(events: list[dict[str, Any]]) -> bool:
    """True when a job's history ends with it running (the daemon died) or stopped by a daemon shutdown."""
    states = [e for e in events if e.get("event") == "state"]
    if not states:
        return False
    last = states[-1]
    if last.get("new") in ("STOPPED", "FINISHED", "FATAL"):
        return last.get("new") == "STOPPED" and last.get("reason") == "daemon shutdown"
    return True


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT or `shutdown`; every worker checkpoints and exits first."""
    return DaemonService(config).serve()
