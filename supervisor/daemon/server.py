"""``mlxsupd -c CONFIG``: the long-running daemon over every configured job, with its control plane."""

from __future__ import annotations

from typing import Any

import structlog

from protocol.control import ControlError
from supervisor.config import Config, ConfigError, load_config
from supervisor.control.server import ControlServer
from supervisor.core.states import TERMINAL_STATES
from supervisor.daemon.loop import Daemon

log = structlog.get_logger("mlxsupd")


class DaemonService:
    """The daemon plus what only the service mode has: control socket, events, config reload."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.daemon = Daemon(config)
        self.pending: Config | None = None
        self.removing: set[str] = set()
        self.restart_when_stopped: set[str] = set()
        try:
            self.control = ControlServer(self, self.daemon.context, self.daemon.run_dir, config.daemon.control,
                                         lambda value: config.resolve(value, config.path.parent))
        except BaseException:
            self.daemon.close()
            raise
        self.daemon.extra_sockets.update(self.control.sockets())
        self.daemon.publishers.append(self.control.publish)
        self.daemon.on_reload = self._on_hup
        self.daemon.on_turn = self._on_turn

    # -- config reload --------------------------------------------------------------------------------

    def reread(self) -> dict[str, list[str]]:
        """Load the config file again; report what an update would change."""
        try:
            new = load_config(self.config.path, total_memory=self.daemon.total_memory)
        except ConfigError as exc:
            raise ControlError(ControlError.BAD_VALUE, f"config not reloaded: {exc}") from None
        self.pending = new
        old_jobs, new_jobs = self.config.jobs, new.jobs
        return {
            "added": sorted(set(new_jobs) - set(old_jobs)),
            "removed": sorted(set(old_jobs) - set(new_jobs)),
            "changed": sorted(n for n in set(old_jobs) & set(new_jobs) if old_jobs[n] != new_jobs[n]),
        }

    def update(self) -> dict[str, list[str]]:
        """Apply the last reread: add, remove (after a checkpoint) and reconfigure jobs."""
        changes = self.reread() if self.pending is None else self._diff(self.pending)
        new = self.pending
        assert new is not None
        now = self.daemon.system.now()
        self.config = new
        self.daemon.config = new
        for name in changes["added"]:
            job = self.daemon.add_job(name)
            if job.config.autostart:
                job.start(now, "added by update")
        for name in changes["removed"]:
            self.removing.add(name)
            self.daemon.jobs[name].stop(now, "removed from config")
        for name in changes["changed"]:
            self.daemon.jobs[name].reconfigure(new.jobs[name], new.jobs[name].limits(self.daemon.total_memory))
        try:
            self.control.reload_keys(new.daemon.control, lambda v: new.resolve(v, new.path.parent))
        except ConfigError as exc:
            raise ControlError(ControlError.BAD_VALUE, f"authorized keys not reloaded: {exc}") from None
        self.pending = None
        log.info("config_updated", **changes)
        return changes

    def _diff(self, new: Config) -> dict[str, list[str]]:
        old_jobs = self.config.jobs
        return {
            "added": sorted(set(new.jobs) - set(old_jobs)),
            "removed": sorted(set(old_jobs) - set(new.jobs)),
            "changed": sorted(n for n in set(old_jobs) & set(new.jobs) if old_jobs[n] != new.jobs[n]),
        }

    def _on_hup(self, now: float) -> None:
        log.info("sighup", action="reread and update")
        try:
            self.reread()
            self.update()
        except Exception as exc:  # a bad config on SIGHUP keeps the running one
            log.error("reload_failed", error=str(exc))
            self.pending = None

    def _on_turn(self, daemon: Daemon, now: float) -> None:
        for name in list(self.removing):
            job = daemon.jobs.get(name)
            if job is None or (not job.busy and job.state in TERMINAL_STATES):
                if job is not None:
                    job.recorder.close()
                daemon.jobs.pop(name, None)
                self.removing.discard(name)
                log.info("job_removed", job=name)
        for name in list(self.restart_when_stopped):
            job = daemon.jobs.get(name)
            if job is not None and not job.busy and job.state in TERMINAL_STATES:
                self.restart_when_stopped.discard(name)
                job.start(now, "restart requested")

    # -- lifetime -------------------------------------------------------------------------------------

    def serve(self) -> int:
        daemon = self.daemon
        daemon.install_signal_handlers()
        now = daemon.system.now()
        log.info("daemon_started", config=str(self.config.path), jobs=sorted(daemon.jobs),
                 control=self.control.endpoint, events=self.control.events_endpoint)
        for job in daemon.jobs.values():
            if job.config.autostart:
                job.start(now, "autostart")
            elif was_active(job.history.events):
                job.start(now, "resume: the job was running when the daemon stopped")
        try:
            return daemon.run()
        finally:
            self.close()
            log.info("daemon_stopped")

    def close(self) -> None:
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
