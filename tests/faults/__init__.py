"""The fault campaign: real daemons, real workers and real signals, bounded in count and time.

``python -m tests.faults [--quick]`` runs every fault module in turn (worker and daemon SIGKILLs, a hung
worker, a full disk, damaged checkpoints, PID reuse, protocol fuzzing, authentication and path checks), prints
a table and writes ``.faults/summary.json``. Everything happens on loopback TCP or ipc sockets in private
directories under /tmp, and every process it starts is killed by process group on the way out.
"""

from __future__ import annotations
