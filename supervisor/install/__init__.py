"""Installing mlxsupd as a launchd or systemd service."""
