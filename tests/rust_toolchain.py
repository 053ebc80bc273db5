"""How this machine builds the Rust SDK (sdk/rust), or why it cannot: one answer for the tests and the Makefile.

- Debian's packaged crates are installed (``/usr/share/cargo/registry`` holds ``zmq``): build offline from them,
  through ``--config debian-registry.toml`` (the source replacement applies nowhere else).
- macOS: cargo from Homebrew, crates from crates.io.
- Elsewhere, crates.io only when ``MLXSUP_RUST_CRATES_IO=1`` says the network reaches it.
- Otherwise: no plan, and a reason that the Rust tests print as they skip (never a silent pass, never red).

``python -m tests.rust_toolchain`` prints the cargo arguments (for ``make rust``), or the reason on stderr and
exits 3.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

CRATE = Path(__file__).resolve().parent.parent / "sdk" / "rust"
DEBIAN_REGISTRY = Path("/usr/share/cargo/registry")
# The crates sdk/rust/Cargo.toml depends on, as Debian's librust-*-dev packages name their directories.
NEEDED = ("zmq", "rmp-serde", "serde", "serde_json", "sha2", "libc")
HINT = {
    "linux": "as root on Debian or Ubuntu, `make sysdeps` (make test runs it) installs cargo and the packaged "
    "crates; elsewhere install cargo and libzmq and set MLXSUP_RUST_CRATES_IO=1",
    "darwin": "`brew install rust zeromq pkg-config` (make test runs it where Homebrew is installed)",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The cargo program and the arguments every cargo command takes here; or why the Rust SDK cannot be built."""

    cargo: str | None
    args: tuple[str, ...]
    skip_reason: str | None

    @property
    def runnable(self) -> bool:
        return self.skip_reason is None


def _missing_crates(registry: Path) -> list[str]:
    if not registry.is_dir():
        return list(NEEDED)
    have = {entry.name.rsplit("-", 1)[0] for entry in registry.iterdir()}
    return [name for name in NEEDED if name not in have]


def plan(environ: dict[str, str] | None = None, platform: str | None = None,
         registry: Path = DEBIAN_REGISTRY) -> Plan:
    """Decide how cargo builds the crate here (pure but for PATH and directory look-ups)."""
    env = dict(os.environ) if environ is None else environ
    platform = platform or sys.platform
    hint = HINT["darwin" if platform == "darwin" else "linux"]
    if env.get("MLXSUP_SKIP_RUST") == "1":
        return Plan(None, (), "MLXSUP_SKIP_RUST=1")
    cargo = env.get("CARGO") or shutil.which("cargo", path=env.get("PATH"))
    if cargo is None:
        return Plan(None, (), f"no cargo on PATH: {hint}")
    missing = _missing_crates(registry)
    if not missing:
        return Plan(cargo, ("--config", str(CRATE / "debian-registry.toml"), "--offline"), None)
    if platform == "darwin" or env.get("MLXSUP_RUST_CRATES_IO") == "1":
        return Plan(cargo, (), None)  # crates.io
    return Plan(None, (), f"Debian's packaged crates are not installed ({registry} lacks {', '.join(missing)}) "
                f"and crates.io is not assumed reachable: {hint}")


def main() -> int:
    found = plan()
    if not found.runnable:
        print(f"Rust SDK not built: {found.skip_reason}", file=sys.stderr)
        return 3
    print(" ".join([found.cargo or "cargo", *found.args]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
