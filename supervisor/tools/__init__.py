"""Tools around the daemon: the policy simulator, memory plots and the generated config reference."""
