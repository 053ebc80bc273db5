"""Config: TOML into frozen dataclasses, strictly. An unknown key or a bad value names itself.

Each field's help lives in its metadata; the config reference (docs/config.md) is generated from these.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import tomllib
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from supervisor import paths
from supervisor.core.policy import Limits
from supervisor.core.sizes import SizeError, format_bytes, parse_budget, parse_bytes, parse_fraction_of
from supervisor.hostfile import Layout, LayoutError, build_layout, local_addresses


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the key and the bad value."""


def _f(default: Any, help: str, unit: str = "") -> Any:
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, "unit": unit})
    return dataclasses.field(default=default, metadata={"help": help, "unit": unit})


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """[daemon.control]: remote control and the event stream."""

    tcp: str = _f("", "optional TCP endpoint for remote control, e.g. tcp://0.0.0.0:7781 (requires CURVE)")
    events_tcp: str = _f("", "optional TCP endpoint for the event stream (requires CURVE like `tcp`)")
    server_key: str = _f("", "CURVE secret key file of the daemon (made by `mlxsupctl keygen`)")
    authorized_keys: str = _f("", "file listing the public keys allowed over TCP, one per line, each with an "
                                  "optional role (read, operate, admin; default admin) and name")
    allow_plaintext_loopback: bool = _f(False, "allow TCP without CURVE, only when bound to 127.0.0.1/::1")


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: where things live and how often the daemon looks."""

    run_dir: str = _f("", "private directory for ipc sockets (0700); default $TMPDIR/mlxsup on macOS (without "
                      "TMPDIR ~/Library/Caches/mlxsup/run, root /var/run/mlxsup), else $XDG_RUNTIME_DIR/mlxsup or "
                      "/tmp/mlxsup-UID")
    state_dir: str = _f("", "history, checkpoints and logs; default ~/Library/Application Support or XDG state")
    log_dir: str = _f("", "daemon and worker logs; default ~/Library/Logs/mlx-supervisor or <state_dir>/logs")
    sample_interval: float = _f(0.05, "seconds between footprint samples of each worker near its budget", "s")
    calm_sample_interval: float = _f(0.25, "longest gap between samples of a worker far below its budget: as many "
                                           "sample_intervals as growth at growth_rate needs to reach the budget; "
                                           "equal to sample_interval: sample every worker at that rate", "s")
    growth_rate: str = _f("16GiB", "footprint growth per second the sampling cadence allows for: a worker growing "
                                   "no faster cannot cross its budget between two samples")
    heartbeat_interval: float = _f(1.0, "seconds between heartbeats to each worker", "s")
    telemetry_hold: float = _f(0.25, "seconds a worker may hold the telemetry of steps far from its warn band and "
                                     "send them together (one daemon wakeup for many steps); 0: every step at once",
                               "s")
    system_floor: str = _f("0", "available system memory below which jobs checkpoint and wait (bytes or %)")
    floor_hysteresis: str = _f("512MiB", "memory above the floor needed before waiting jobs resume")
    log_format: str = _f("auto", "daemon log lines: auto (console on a terminal, else json), console, json")
    log_file: str = _f("", "daemon log file (default: stderr, which launchd/systemd capture); SIGUSR1 reopens it")
    log_max_bytes: str = _f("50MiB", "rotate the daemon log file, audit.jsonl, each job's history.jsonl and "
                                      "telemetry.jsonl (and worker logs, at spawn) past this size")
    log_keep: int = _f(3, "rotated log files kept")
    control: ControlConfig = dataclasses.field(default_factory=ControlConfig, metadata={"help": "", "unit": ""})


@dataclasses.dataclass(frozen=True)
class GangConfig:
    """[jobs.NAME.gang]: how the daemons of a gang over several hosts find each other."""

    host: str = _f("", "this daemon's entry of hosts or of the hostfile (address or ssh name); default: the "
                   "one whose address is on this machine")
    leader: str = _f("", "followers: control endpoint of the daemon holding rank 0, e.g. tcp://10.0.0.1:7781")
    leader_key: str = _f("", "followers: the leader daemon's public key file (its server_key's .key)")
    client_key: str = _f("", "followers: this daemon's secret key file, listed in the leader's authorized_keys")
    port: int = _f(32323, "first ring port; every generation of the gang listens on fresh ports after it")
    sync_interval: float = _f(0.2, "followers: seconds between state exchanges with the leader", "s")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """[jobs.NAME]: one supervised training job."""

    command: list[str] = _f([], "argv of a custom training script using worker.Session; empty: the built-in LM")
    train: dict[str, Any] = _f({}, "options of the built-in LM (`python -m worker --help`), e.g. steps = 1000")
    mlx_lm: dict[str, Any] = _f({}, "an mlx-lm fine-tune: mlx_lm.lora's options (see [jobs.NAME.mlx_lm]); "
                                "sets batch and accum")
    env: dict[str, str] = _f({}, "extra environment variables for the worker")
    working_dir: str = _f("", "working directory of the worker (default: the daemon's)")
    autostart: bool = _f(True, "start with the daemon")
    budget: str = _f("50%", "hard memory budget: bytes (12GiB), percent of total (75%) or 'total - 4GiB'")
    warn: str = _f("85%", "warn band (percent of budget or bytes): ask the worker to clear its cache")
    kill: str = _f("110%", "kill ceiling (percent of budget or bytes): SIGTERM the group at once")
    batch: int = _f(8, "configured micro-batch; shrinks on peaks, regrows up to this")
    accum: int = _f(1, "configured gradient accumulation")
    min_batch: int = _f(1, "smallest batch a shrink may reach")
    shrink_factor: float = _f(0.5, "batch multiplier on a peak breach")
    keep_effective_batch: bool = _f(True, "raise accumulation on a shrink so batch x accum stays the same")
    policy: str = _f("adaptive", "adaptive (leak: recycle, peak: shrink, regrow), shrink-only, "
                     "or stop (at the first breach)")
    leak_threshold: str = _f("1MiB", "growth per step above which a breach is a leak", "bytes/step")
    diagnose_on_leak: bool = _f(False, "at the first leak verdict of a run, ask the worker for a census of what "
                                "its loop holds (`mlxsupctl diagnose`; Python SDK)")
    leak_rate: str = _f("1MiB", "guard-only lives (sdk = false, or \"auto\" before a hello): sampled growth per "
                        "second above which a breach is a leak (else a spike)", "bytes/s")
    regrow_after_steps: int = _f(50, "healthy steps before trying a larger batch")
    min_steps_per_life: int = _f(10, "recycling more often than this also shrinks the batch")
    checkpoint_dir: str = _f("", "checkpoints of this job (default <state_dir>/jobs/NAME/checkpoints)")
    checkpoint_every: int = _f(100, "steps between periodic checkpoints (0: only when asked)")
    keep_checkpoints: int = _f(3, "checkpoints kept on disk")
    checkpoint_timeout: float = _f(30.0, "seconds a checkpoint-and-exit may take before SIGTERM", "s")
    kill_grace: float = _f(3.0, "seconds between SIGTERM and SIGKILL", "s")
    startup_timeout: float = _f(120.0, "seconds from spawn to the worker's hello", "s")
    hang_timeout: float = _f(60.0, "seconds without telemetry before the worker counts as hung", "s")
    backoff_initial: float = _f(1.0, "first delay before restarting a crashed worker", "s")
    backoff_max: float = _f(60.0, "longest delay between restarts", "s")
    max_attempts_without_progress: int = _f(5, "consecutive starts without a newer checkpoint before FATAL")
    cache_clear: str = _f("0", "worker clears MLX's cache above this many bytes (0: never)")
    cache_limit: str = _f("10%", "MLX cache limit set in the worker: percent of budget or bytes (0: MLX's default)")
    ranks: int = _f(1, "ranks of a data-parallel gang on each host (ring backend; the daemon sets MLX_RANK and "
                    "MLX_HOSTFILE); budget, warn and kill then apply to each rank")
    hosts: list[str] = _f([], "a gang over several hosts: their IP addresses in rank order, each running "
                          "`ranks` ranks, one mlxsupd each ([jobs.NAME.gang])")
    hostfile: str = _f("", "instead of hosts: mlx.launch's hostfile JSON (one entry per rank)")
    gang: GangConfig = dataclasses.field(default_factory=GangConfig, metadata={"help": "", "unit": ""})
    sdk: bool | str = _f(True, "true: the worker uses the SDK (hello, telemetry, checkpoints); false: a guard-only "
                         "job: `command` runs under outside sampling alone (no hello, no telemetry, no checkpoints); "
                         "SIGTERM at the budget, SIGKILL at the ceiling or after kill_grace; \"auto\": learned in "
                         "each life: guard-only until its worker says hello (whenever that comes; no startup or "
                         "hang timeout before it), an SDK job from the hello on")
    restart: str = _f("on-breach", "guard-only jobs: 'on-breach' starts the command over after a budget kill, "
                      "'never' leaves it stopped")

    def limits(self, total: int) -> Limits:
        """Resolve budget, warn and kill to bytes (validated at load)."""
        budget = parse_budget(self.budget, total)
        return Limits(parse_fraction_of(self.warn, budget), budget, parse_fraction_of(self.kill, budget))


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole config file."""

    path: Path
    daemon: DaemonConfig
    jobs: dict[str, JobConfig]

    def resolve(self, value: str, default: Path) -> Path:
        """A path from the config: relative to the config file's directory; default when empty."""
        if not value:
            return default
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.path.parent / path).resolve()

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.daemon.state_dir, paths.default_state_dir())

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.daemon.run_dir, paths.default_run_dir())

    @property
    def log_dir(self) -> Path:
        default = paths.default_log_dir() if not self.daemon.state_dir else self.state_dir / "logs"
        return self.resolve(self.daemon.log_dir, default)

    def job_dir(self, name: str) -> Path:
        return self.state_dir / "jobs" / name

    def checkpoint_dir(self, name: str) -> Path:
        return self.resolve(self.jobs[name].checkpoint_dir, self.job_dir(name) / "checkpoints")

    def layout(self, name: str, addresses: list[str] | None = None) -> Layout | None:
        """The gang of job ``name`` (None for a plain job); LayoutError names a problem."""
        job = self.jobs[name]
        hostfile = self.resolve(job.hostfile, Path()) if job.hostfile else None
        return build_layout(job.ranks, job.hosts, hostfile, job.gang.host, job.gang.port,
                            local_addresses() if addresses is None else addresses)


def load_config(path: str | Path, total_memory: int | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming the first problem."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(raw, path.resolve(), total_memory)


def parse_config(raw: dict[str, Any], path: Path, total_memory: int | None = None) -> Config:
    _reject_unknown(raw, {"daemon", "jobs"}, "", path)
    daemon = _build(DaemonConfig, raw.get("daemon", {}), "daemon", path)
    jobs_raw = raw.get("jobs", {})
    if not isinstance(jobs_raw, dict):
        raise ConfigError(f"{path}: [jobs] must be a table of jobs")
    jobs = {name: _build(JobConfig, table, f"jobs.{name}", path) for name, table in jobs_raw.items()}
    jobs = {name: _mlx_lm_job(name, job, jobs_raw[name], path) for name, job in jobs.items()}
    config = Config(path, daemon, jobs)
    _validate(config, total_memory if total_memory is not None else _total_memory())
    return config


def _mlx_lm_job(name: str, job: JobConfig, table: dict[str, Any], path: Path) -> JobConfig:
    """An ``mlx_lm`` table checked against the rest of the job; its batch and accum become the job's."""
    if not job.mlx_lm:
        return job
    from worker.mlx_lm.options import configure_job
    from worker.mlx_lm.requirement import MlxLmUnavailable

    try:
        cache_clear = parse_bytes(job.cache_clear) if "cache_clear" in table else None
        kind = configure_job(job.mlx_lm, table, path.parent, cache_clear)
    except (ValueError, MlxLmUnavailable) as exc:  # OptionError and SizeError are ValueErrors
        raise ConfigError(f"{path}: jobs.{name}: {exc}") from None
    return dataclasses.replace(job, mlx_lm=kind.table, batch=kind.batch, accum=kind.accum)


def _total_memory() -> int:
    from supervisor.daemon.footprint import system_memory

    return system_memory()[1]


def _reject_unknown(table: dict[str, Any], known: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f"; known keys: {', '.join(sorted(known))}"
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{path}: unknown key {name!r}{hint}")


def _build(cls: type[Any], table: Any, where: str, path: Path) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{where}] must be a table, got {type(table).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(table, set(fields), where, path)
    values = {}
    for key, value in table.items():
        kind = hints[key]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{where}.{key}", path)
        else:
            values[key] = _coerce(value, kind, f"{where}.{key}", path)
    return cls(**values)


def _coerce(value: Any, kind: Any, name: str, path: Path) -> Any:
    origin = get_origin(kind)
    ok: bool
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        # Sizes may be written as plain integers (bytes).
        ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
        value = str(value) if ok else value
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif origin is dict:
        ok = isinstance(value, dict)
        if ok and get_args(kind)[1] is str:
            ok = all(isinstance(v, str) for v in value.values())
    elif origin in (Union, types.UnionType):  # the first member type that takes the value
        for member in get_args(kind):
            try:
                return _coerce(value, member, name, path)
            except ConfigError:
                continue
        ok = False
    else:  # pragma: no cover
        raise ConfigError(f"{path}: {name}: unsupported type {kind}")
    if not ok:
        expected = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{path}: {name} = {value!r}: expected {expected}, got {type(value).__name__}")
    return value


def _validate(config: Config, total: int) -> None:
    where = config.path
    d = config.daemon
    for key in ("sample_interval", "heartbeat_interval"):
        if not 0.001 <= getattr(d, key) <= 60:
            raise ConfigError(f"{where}: daemon.{key} = {getattr(d, key)}: must be between 0.001 and 60 seconds")
    if not d.sample_interval <= d.calm_sample_interval <= 60:
        raise ConfigError(f"{where}: daemon.calm_sample_interval = {d.calm_sample_interval}: must be between "
                          f"sample_interval ({d.sample_interval}) and 60 seconds")
    try:
        if parse_bytes(d.growth_rate) <= 0:
            raise SizeError(f"{d.growth_rate!r} must be more than 0 bytes per second")
    except SizeError as exc:
        raise ConfigError(f"{where}: daemon.growth_rate: {exc}") from None
    if not 0 <= d.telemetry_hold <= 10:
        raise ConfigError(f"{where}: daemon.telemetry_hold = {d.telemetry_hold}: must be between 0 and 10 seconds")
    if d.log_format not in ("auto", "console", "json"):
        raise ConfigError(f"{where}: daemon.log_format = {d.log_format!r}: expected auto, console or json")
    try:
        parse_bytes(d.log_max_bytes)
    except SizeError as exc:
        raise ConfigError(f"{where}: daemon.log_max_bytes: {exc}") from None
    if d.log_keep < 0:
        raise ConfigError(f"{where}: daemon.log_keep = {d.log_keep}: must be 0 or more")
    for key in ("system_floor", "floor_hysteresis"):
        try:
            parse_fraction_of(getattr(d, key), total)
        except SizeError as exc:
            raise ConfigError(f"{where}: daemon.{key}: {exc}") from None
    for name in paths.IPC_SOCKETS:
        if problem := paths.socket_path_problem(config.run_dir / name):
            raise ConfigError(f"{where}: daemon.run_dir: {problem}")
    for name, job in config.jobs.items():
        _validate_job(name, job, total, where)
        _validate_gang(config, name, total)


def check_limits(limits: Limits) -> None:
    """SizeError unless warn <= budget < kill (the escalation bands must come in this order)."""
    if not limits.warn <= limits.budget < limits.kill:
        raise SizeError(f"need warn <= budget < kill, got warn {format_bytes(limits.warn)}, budget "
                        f"{format_bytes(limits.budget)}, kill {format_bytes(limits.kill)}")


def _validate_job(name: str, job: JobConfig, total: int, where: Path) -> None:
    prefix = f"{where}: jobs.{name}"
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        raise ConfigError(f"{prefix}: job names use letters, digits, '-' and '_' (at most 64 chars)")
    try:
        limits = job.limits(total)
        parse_bytes(job.leak_threshold)
        parse_bytes(job.leak_rate)
        parse_bytes(job.cache_clear)
        parse_fraction_of(job.cache_limit, limits.budget)
        check_limits(limits)
    except SizeError as exc:
        raise ConfigError(f"{prefix}: {exc}") from None
    positive = ("batch", "accum", "min_batch", "keep_checkpoints", "max_attempts_without_progress", "ranks")
    for key in positive:
        if getattr(job, key) < 1:
            raise ConfigError(f"{prefix}.{key} = {getattr(job, key)}: must be at least 1")
    if job.min_batch > job.batch:
        raise ConfigError(f"{prefix}.min_batch = {job.min_batch}: larger than batch = {job.batch}")
    if not 0 < job.shrink_factor < 1:
        raise ConfigError(f"{prefix}.shrink_factor = {job.shrink_factor}: must be between 0 and 1")
    if job.policy not in ("adaptive", "shrink-only", "stop"):
        raise ConfigError(f"{prefix}.policy = {job.policy!r}: expected 'adaptive', 'shrink-only' or 'stop'")
    for key in ("checkpoint_timeout", "kill_grace", "startup_timeout", "hang_timeout", "backoff_initial",
                "backoff_max"):
        if getattr(job, key) <= 0:
            raise ConfigError(f"{prefix}.{key} = {getattr(job, key)}: must be positive")
    if job.checkpoint_every < 0 or job.regrow_after_steps < 1 or job.min_steps_per_life < 0:
        raise ConfigError(f"{prefix}: checkpoint_every >= 0, regrow_after_steps >= 1, min_steps_per_life >= 0")
    if isinstance(job.sdk, str) and job.sdk != "auto":
        raise ConfigError(f"{prefix}.sdk = {job.sdk!r}: expected true, false or \"auto\"")
    if job.sdk is False and not job.command:
        raise ConfigError(f"{prefix}.sdk = false: a guard-only job needs a 'command' (the built-in job uses the SDK)")
    if job.restart not in ("on-breach", "never"):
        raise ConfigError(f"{prefix}.restart = {job.restart!r}: expected 'on-breach' or 'never'")
    if job.sdk is True and job.restart != "on-breach":
        raise ConfigError(f"{prefix}.restart applies to guard-only jobs (sdk = false or \"auto\" before a hello); "
                          "SDK jobs restart by 'policy'")
    if job.command and job.train:
        raise ConfigError(f"{prefix}: 'train' options apply to the built-in job only; remove them or 'command'")
    managed = {"batch", "accum", "checkpoint_dir", "checkpoint-dir"} & set(job.train)
    if managed:
        raise ConfigError(f"{prefix}.train: {sorted(managed)} are set by the supervisor: use jobs.{name}.<key>")
    if not job.command:
        from worker.cli import train_argv

        try:
            train_argv(job.train)
        except ValueError as exc:
            raise ConfigError(f"{prefix}.train: {exc}") from None


def _validate_gang(config: Config, name: str, total: int) -> None:
    prefix = f"{config.path}: jobs.{name}"
    job = config.jobs[name]
    if runs_mlx_launch(job.command):
        raise ConfigError(f"{prefix}.command runs mlx.launch, which reports success when a rank dies and cuts off "
                          "ranks still writing a checkpoint: give the training script itself as the command and "
                          "set ranks (one host) or hosts/hostfile (several), and mlxsupd starts the ranks")
    if job.hosts and job.hostfile:
        raise ConfigError(f"{prefix}: give hosts or hostfile, not both")
    try:
        layout = config.layout(name)
    except LayoutError as exc:
        raise ConfigError(f"{prefix}: {exc}") from None
    if layout is None:
        return
    if job.sdk is not True:
        raise ConfigError(f"{prefix}: a gang needs the SDK (sdk = true): its ranks stop and checkpoint together "
                          "through it")
    if job.mlx_lm:
        raise ConfigError(f"{prefix}: an mlx-lm fine-tune cannot run as a gang yet (its trainer reduces gradients "
                          "without the gang's stop flags); use ranks = 1")
    local = len(layout.local_ranks)
    if local * job.limits(total).budget >= total:
        raise ConfigError(f"{prefix}: {local} ranks x budget {job.budget} do not fit in this machine's memory")
    if len(layout.hosts) > 1 and not layout.leader and not (job.gang.leader and job.gang.client_key
                                                            and job.gang.leader_key):
        raise ConfigError(f"{prefix}.gang: this host follows the gang: set leader, leader_key and client_key")
    if len(layout.hosts) > 1 and layout.leader and not config.daemon.control.tcp:
        raise ConfigError(f"{prefix}: this host leads the gang: set daemon.control.tcp for the followers")
    if not 0.01 <= job.gang.sync_interval <= 10:
        raise ConfigError(f"{prefix}.gang.sync_interval = {job.gang.sync_interval}: must be 0.01 to 10 seconds")


def runs_mlx_launch(command: list[str]) -> bool:
    """Whether a command starts MLX's launcher (``mlx.launch ...`` or ``python -m mlx.launch ...``)."""
    words = [Path(word).name for word in command[:4]]
    return "mlx.launch" in words or "mlx._distributed_utils.launch" in words


def worker_argv(job: JobConfig) -> list[str]:
    """The command that runs this job's worker."""
    if job.command:
        return list(job.command)
    if job.mlx_lm:
        from worker.mlx_lm.options import to_argv

        return [sys.executable, "-m", "worker.mlx_lm", *to_argv(job.mlx_lm)]
    from worker.cli import train_argv

    return [sys.executable, "-m", "worker", *train_argv(job.train)]


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string, list or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def write_config(path: Path, daemon: dict[str, Any], jobs: dict[str, dict[str, Any]]) -> Path:
    """Write a config file: ``daemon`` keys (a dict value becomes a sub-table such as [daemon.control]), then
    ``[jobs.NAME]`` and its ``train`` table. Used by tests and benchmarks; load_config validates the result."""
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items() if not isinstance(v, dict)]
    for key, table in daemon.items():
        if isinstance(table, dict):
            lines += [f"[daemon.{key}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for name, job in jobs.items():
        lines.append(f"[jobs.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in job.items() if k != "train"]
        if "train" in job:
            lines.append(f"[jobs.{name}.train]")
            lines += [f"{k} = {toml_value(v)}" for k, v in job["train"].items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
