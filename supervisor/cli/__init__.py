"""Command-line entry points: ``mlxsupd`` (the daemon) and ``mlxsupctl`` (its control client)."""
