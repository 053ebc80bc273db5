"""The package boundaries the architecture promises, checked by importing in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(statement: str) -> set[str]:
    """Top-level packages of the project (and mlx) in sys.modules after running ``statement``."""
    probe = (f"import sys; {statement}; "
             "import json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1])) & {"supervisor", "worker", "protocol", "mlx"}


class TestImportBoundaries:
    """worker/ imports only protocol/; the daemon never imports MLX; protocol/ imports neither."""

    def test_worker_sdk_and_builtin_job_do_not_import_the_daemon(self) -> None:
        assert loaded_after("import worker.session, worker.checkpoint, worker.train, worker.__main__") == {
            "worker", "protocol", "mlx"}

    def test_daemon_service_and_cli_do_not_import_mlx(self) -> None:
        assert "mlx" not in loaded_after(
            "import supervisor.daemon.server, supervisor.daemon.run, supervisor.cli.mlxsupctl, supervisor.cli.live")

    def test_protocol_stands_alone(self) -> None:
        assert loaded_after("import protocol, protocol.control, protocol.footprint, protocol.checkpoints, "
                            "protocol.vectors, protocol.conformance") == {"protocol"}
