"""The dashboard and Prometheus pages of ``mlxsupctl dashboard`` (clients of the control and event sockets)."""
