"""A fake JACCL rank (no RDMA here): records the JACCL environment the daemon gave it, reads the device file as
MLX's JACCL does, then trains the built-in LM over a ring at the coordinator's address (rank R at its port + R).

    python tests/workers/fake_jaccl.py OUT_DIR WORKER_ARGS...
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

NAMES = ("MLX_RANK", "MLX_JACCL_COORDINATOR", "MLX_IBV_DEVICES", "MLX_JACCL_RING", "MLXSUP_BACKEND",
         "MLX_METAL_FAST_SYNCH", "MLX_HOSTFILE")


def main() -> None:
    out = Path(sys.argv[1])
    record: dict[str, object] = {name: os.environ.get(name) for name in NAMES}
    record["devices"] = json.loads(Path(os.environ["MLX_IBV_DEVICES"]).read_text())
    with open(out / f"rank-{os.environ['MLX_RANK']}.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    # The fake part: JACCL cannot start without Thunderbolt RDMA, so the ranks meet over a ring instead.
    host, _, port = os.environ["MLX_JACCL_COORDINATOR"].rpartition(":")
    ring = out / f"ring-{port}.json"
    tmp = out / f"ring-{port}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps([[f"{host}:{int(port) + r}"] for r in range(int(os.environ["MLXSUP_RANKS"]))]))
    os.replace(tmp, ring)
    os.environ.update(MLXSUP_BACKEND="ring", MLX_HOSTFILE=str(ring))
    sys.argv = ["worker", *sys.argv[2:]]
    runpy.run_module("worker", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
