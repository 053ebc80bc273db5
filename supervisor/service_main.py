"""``mlxsupd -c CONFIG``: the long-running daemon over every configured job."""

from __future__ import annotations

from supervisor.config import Config
from supervisor.daemon import Daemon


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; every worker checkpoints and exits first."""
    daemon = Daemon(config)
    daemon.install_signal_handlers()
    now = daemon.system.now()
    for job in daemon.jobs.values():
        if job.config.autostart:
            job.start(now, "autostart")
    try:
        return daemon.run()
    finally:
        daemon.close()
