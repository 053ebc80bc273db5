"""The control plane: the daemon's request and event sockets, the client, and the command registry."""
