"""``mlxsupd run [OPTIONS] -- CMD [ARGS...]``: a job from a command line, as the ``Config`` a file would give.

The options become the raw tables of a config (``[daemon]`` and one ``[jobs.NAME]``), which ``parse_config``
validates exactly as it would a file, so there is one way to run a job. An mlx-lm command (``mlx_lm.lora ...``,
``mlx_lm lora ...``, ``python -m mlx_lm lora ...``, ``python -m mlx_lm.lora ...``) becomes the ``mlx_lm`` job
kind with the same options, so it resumes exactly with no change to the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from supervisor import paths
from supervisor.config import Config, ConfigError, parse_config, runs_mlx_launch
from supervisor.core.sizes import SizeError, format_bytes, parse_budget, parse_fraction_of

GiB = 1 << 30
DEFAULT_BUDGET_HELP = ("total - max(8GiB, 25%%), and never under half of total memory (so a 16 GiB machine "
                       "gets 8 GiB, a 64 GiB one 48 GiB)")
PYTHON_RE = re.compile(r"python(\d+(\.\d+)?)?")
MLX_LM_MODULES = ("mlx_lm.lora",)
# How a script shows that it speaks the SDK (used until the lifecycle learns it from the hello).
SDK_MARKERS = re.compile(r"^\s*(from\s+worker(\.session)?\s+import|import\s+worker\b)", re.MULTILINE)


class UsageError(ValueError):
    """A command line that cannot be run (mlxsupd exits 2); the message names the option and the value."""


@dataclasses.dataclass(frozen=True)
class Command:
    """What the command after ``--`` is: an mlx-lm fine-tune (its options) or any other program."""

    argv: list[str]
    mlx_lm: list[str] | None  # mlx_lm.lora's arguments when the command is an mlx-lm fine-tune
    sdk_guess: bool  # a Python script that imports the SDK (worker.Session): what `mlxsupctl init` writes


def default_budget(total: int) -> int:
    """The budget without --budget: total - max(8GiB, 25%), at least half of total memory."""
    reserve = min(max(8 * GiB, total // 4), total // 2)
    return total - reserve


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The options of the one-line form (they apply only with ``-- CMD``)."""
    group = run.add_argument_group("one-line form: mlxsupd run [OPTIONS] -- CMD [ARGS...] (no config file needed)")
    add = group.add_argument
    add("--budget", help="hard memory budget: bytes (12GiB), percent of total (75%%) or 'total - 4GiB'; "
        f"default {DEFAULT_BUDGET_HELP}")
    add("--warn", help="warn band: percent of budget or bytes (default 85%%)")
    add("--kill", help="kill ceiling: percent of budget or bytes, above the budget (default 110%%)")
    add("--floor", help="available system memory under which the job waits (bytes or %%; default 0)")
    add("--batch", type=int, help="SDK workers: configured micro-batch (default 8)")
    add("--accum", type=int, help="SDK workers: configured gradient accumulation (default 1)")
    add("--ranks", type=int, help="a data-parallel gang of N ranks on this host (the daemon sets MLX_RANK and "
        "MLX_HOSTFILE; CMD must speak the SDK, as an mlx-lm command does); --budget is then per rank "
        "(default: the single job's default / N)")
    add("--name", help="job name (default: from the command, e.g. the script's stem)")
    add("--restart", choices=["on-breach", "never"], help="guard-only commands: start over after a budget kill "
        "(on-breach, the default) or stop")
    add("--max-attempts", type=int, help="starts in a row without progress before giving up (default 5)")
    add("--sdk", choices=["auto", "yes", "no"], default="auto",
        help="whether CMD speaks the Session SDK (default auto: guarded by sampling alone until its worker says "
        "hello, an SDK job from then on; an mlx-lm command always does)")
    add("--state-dir", type=Path, help="history, checkpoints, logs and the control socket's run dir "
        f"(default {paths.default_state_dir()}; the run dir is then the platform's)")
    add("--plot", type=Path, help="after the run, plot memory to this PNG or SVG (needs matplotlib)")
    add("--max-steps", type=int, help="a short measuring run: stop (after a checkpoint) once N steps are done")


ONE_LINE_KEYS = ("budget", "warn", "kill", "floor", "batch", "accum", "name", "restart", "max_attempts",
                 "state_dir", "plot", "max_steps", "ranks")


def given_one_line_options(args: argparse.Namespace) -> list[str]:
    """The one-line options set on the command line (as --flags), to refuse them in the -c CONFIG JOB form."""
    named = [f"--{k.replace('_', '-')}" for k in ONE_LINE_KEYS if getattr(args, k, None) is not None]
    return named + (["--sdk"] if getattr(args, "sdk", "auto") != "auto" else [])


def classify(argv: list[str], cwd: Path) -> Command:
    """Check that the command can be spawned and find out its kind; UsageError before anything runs."""
    if not argv:
        raise UsageError("no command after '--': mlxsupd run [OPTIONS] -- CMD [ARGS...]")
    program = argv[0]
    if runs_mlx_launch(argv):
        launched = _after_launch_options(argv)
        raise UsageError("mlx.launch reports success when a rank dies and cuts off ranks still writing a checkpoint: "
                         "give what it launches and the number of ranks, and mlxsupd starts them: mlxsupd run "
                         f"--ranks N -- {' '.join(launched) or 'CMD'}")
    mlx_lm = mlx_lm_arguments(argv)
    if mlx_lm is not None:  # runs as python -m worker.mlx_lm under this interpreter, not as the program itself
        return Command(list(argv), mlx_lm, True)
    if "/" in program:
        path = program if os.path.isabs(program) else str(cwd / program)
        if not os.path.isfile(path):
            raise UsageError(f"command {program!r} not found")
        if not os.access(path, os.X_OK):
            raise UsageError(f"command {program!r} is not executable (chmod +x, or run it with its interpreter)")
    elif shutil.which(program) is None:
        raise UsageError(f"command {program!r} not found on PATH")
    sdk = False
    if PYTHON_RE.fullmatch(Path(program).name) and len(argv) > 1 and argv[1].endswith(".py"):
        script = Path(argv[1]) if os.path.isabs(argv[1]) else cwd / argv[1]
        if not script.is_file():
            raise UsageError(f"script {argv[1]!r} not found")
        try:
            sdk = SDK_MARKERS.search(script.read_text(errors="replace")) is not None
        except OSError as exc:
            raise UsageError(f"script {argv[1]!r} cannot be read: {exc.strerror or exc}") from None
    return Command(list(argv), None, sdk)


def mlx_lm_arguments(argv: list[str]) -> list[str] | None:
    """mlx_lm.lora's arguments when ``argv`` is one of mlx-lm's spellings of a fine-tune, else None."""
    name = Path(argv[0]).name
    if name == "mlx_lm.lora":
        return argv[1:]
    if name == "mlx_lm" and argv[1:2] == ["lora"]:
        return argv[2:]
    if PYTHON_RE.fullmatch(name) and argv[1:2] == ["-m"]:
        if argv[2:3] == ["mlx_lm.lora"]:
            return argv[3:]
        if argv[2:4] == ["mlx_lm", "lora"]:
            return argv[4:]
    return None


def _after_launch_options(argv: list[str]) -> list[str]:
    """What ``mlx.launch [its options] CMD ...`` launches (its words after the first that is not one of its
    options), to show the one-line form that runs it; [] when that cannot be told."""
    words = argv[argv.index("mlx.launch") + 1:] if "mlx.launch" in argv else argv[1:]
    with_value = {"-n", "--repeat-hosts", "--hosts", "--hostfile", "--backend", "--env", "--mpi-arg",
                  "--connections-per-ip", "-p", "--starting-port", "--cwd", "--nccl-port", "--python"}
    index = 0
    while index < len(words) and words[index].startswith("-"):
        index += 1 if "=" in words[index] or words[index] not in with_value else 2
    launched = words[index:index + 12]
    return ["python", *launched] if launched and launched[0].endswith(".py") else launched  # as mlx.launch runs it


def job_name(command: Command, given: str | None) -> str:
    """--name, or a name from the command: the script's stem, the module's last part, the program's name."""
    if given:
        return given
    if command.mlx_lm is not None:
        return "lora"
    argv = command.argv
    word = argv[0]
    if PYTHON_RE.fullmatch(Path(word).name) and len(argv) > 1:
        word = argv[2] if argv[1] == "-m" and len(argv) > 2 else argv[1]
        word = word.rsplit(".", 1)[-1] if argv[1] == "-m" else Path(word).stem
    else:
        word = Path(word).stem or word
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", word).strip("-")[:64]
    return name or "job"


def _mlx_lm_table(arguments: list[str], cwd: Path) -> dict[str, Any]:
    """The [jobs.NAME.mlx_lm] table of mlx_lm.lora's arguments, paths made absolute from ``cwd``."""
    from worker.mlx_lm.options import OptionError, build_parser

    try:
        parsed = vars(build_parser().parse_args(arguments))
    except OptionError as exc:
        raise UsageError(f"mlx_lm.lora: {exc}") from None
    table = {key: value for key, value in parsed.items() if value is not None and value is not False}
    for key in ("model", "data", "config", "adapter_path", "resume_adapter_file"):
        value = table.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (key not in ("model", "data")
                                                                    or (cwd / value).exists()):
            table[key] = str((cwd / value).resolve())
    return table


def _file_tables(config: Path | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    if config is None:
        return {}, {}
    try:
        raw = tomllib.loads(config.read_text())
    except FileNotFoundError:
        raise UsageError(f"-c {config}: config file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"-c {config}: cannot read: {exc}") from None
    daemon, jobs = raw.get("daemon", {}), raw.get("jobs", {})
    if not isinstance(daemon, dict) or not isinstance(jobs, dict):
        raise UsageError(f"-c {config}: [daemon] and [jobs] must be tables")
    return daemon, jobs


def _merge(table: dict[str, Any], key: str, value: Any, option: str, where: str) -> None:
    """Set ``key`` from ``option`` unless the file set it to something else (then both are named)."""
    if value is None:
        return
    if key in table and table[key] != value:
        raise UsageError(f"{option} {value} conflicts with {where}.{key} = {table[key]!r} in the config file: "
                         "give one of them")
    table[key] = value


def build(args: argparse.Namespace, argv: list[str], total: int, cwd: Path) -> tuple[Config, str]:
    """The config of the one-line form and its job's name; UsageError or ConfigError names a problem."""
    command = classify(argv, cwd)
    name = job_name(command, args.name)
    daemon_file, jobs_file = _file_tables(args.config)
    daemon = dict(daemon_file)
    job: dict[str, Any] = dict(jobs_file.get(name, {})) if isinstance(jobs_file.get(name, {}), dict) else {}
    where = f"jobs.{name}"
    _merge(daemon, "system_floor", args.floor, "--floor", "daemon")
    if args.state_dir is not None:
        _merge(daemon, "state_dir", str(args.state_dir.resolve()), "--state-dir", "daemon")
        daemon.setdefault("run_dir", str(run_dir_of(args.state_dir.resolve())))
    ranks = _ranks(job, getattr(args, "ranks", None), where)
    budget = args.budget if args.budget is not None else job.get("budget") or str(default_budget(total) // ranks)
    _merge(job, "budget", budget, "--budget", where)
    _merge(job, "warn", args.warn, "--warn", where)
    _merge(job, "kill", args.kill, "--kill", where)
    _merge(job, "max_attempts_without_progress", args.max_attempts, "--max-attempts", where)
    job.setdefault("working_dir", str(cwd))
    if command.mlx_lm is not None:
        _mlx_lm_job(job, command, args, cwd, where)
    else:
        _command_job(job, command, args, where)
    check_limits_named(job, total)
    _check_ranks_fit(job, ranks, total)
    raw = {"daemon": daemon, "jobs": {name: job}}
    origin = args.config.resolve() if args.config is not None else cwd / "mlxsupd-run"
    try:
        config = parse_config(raw, origin, total)
    except ConfigError as exc:
        text = str(exc).removeprefix(f"{origin}: ")
        raise UsageError(text if args.config is not None else text.replace(f"{where}.", "")) from None
    return config, name


def _mlx_lm_job(job: dict[str, Any], command: Command, args: argparse.Namespace, cwd: Path, where: str) -> None:
    assert command.mlx_lm is not None
    if args.sdk == "no":
        raise UsageError("--sdk no: an mlx-lm fine-tune always runs through the SDK (that is how it resumes)")
    for option in ("batch", "accum", "restart"):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option} does not apply to an mlx-lm command: "
                             + ("set --batch-size and --grad-accumulation-steps in its own options"
                                if option != "restart" else "it resumes from its checkpoints"))
    _merge(job, "mlx_lm", _mlx_lm_table(command.mlx_lm, cwd), "the mlx_lm.lora options", where)
    job.pop("command", None)
    job.setdefault("startup_timeout", 600.0)  # the model loads before the hello: allow for a download


def _ranks(job: dict[str, Any], ranks: int | None, where: str) -> int:
    """--ranks N merged into the job (N >= 1); the job's ranks."""
    if ranks is not None and ranks < 1:
        raise UsageError(f"--ranks {ranks}: give 1 or more (the ranks of a data-parallel gang on this host)")
    cores = os.cpu_count() or 1
    if ranks is not None and ranks > cores:
        raise UsageError(f"--ranks {ranks}: this host has {cores} CPU cores, and ranks waiting in a collective spin "
                         f"on one each: give at most {cores}")
    _merge(job, "ranks", ranks, "--ranks", where)
    value = job.get("ranks", 1)
    return value if isinstance(value, int) and value >= 1 else 1  # a bad file value: parse_config names it


def _check_ranks_fit(job: dict[str, Any], ranks: int, total: int) -> None:
    if ranks > 1 and ranks * parse_budget(job["budget"], total) >= total:
        raise UsageError(f"--ranks {ranks} x budget {job['budget']} do not fit in this machine's memory "
                         f"({format_bytes(total)}): lower --budget or --ranks")


def _command_job(job: dict[str, Any], command: Command, args: argparse.Namespace, where: str) -> None:
    sdk: bool | str = {"yes": True, "no": False}.get(args.sdk, "auto")  # auto: learned from the worker's hello
    if args.sdk == "auto" and "sdk" in job:
        sdk = job["sdk"]
    if job.get("ranks", 1) != 1 and sdk is not True:
        if sdk is False or not command.sdk_guess:
            raise UsageError(f"--ranks {job['ranks']}: the ranks of a gang stop and checkpoint together through the "
                             f"SDK, and {' '.join(command.argv[:2])!r} does not import worker.Session"
                             + (" (--sdk no)" if sdk is False else "; give --sdk yes if it does"))
        sdk = True  # a gang is known to speak the SDK before its first hello
    _merge(job, "command", command.argv, "the command after --", where)
    _merge(job, "sdk", sdk, f"--sdk {args.sdk}", where)
    if sdk is False:
        for option in ("batch", "accum", "max_steps"):
            if getattr(args, option) is not None:
                raise UsageError(f"--{option.replace('_', '-')} applies to SDK workers; {command.argv[0]!r} runs "
                                 "guard-only (give --sdk yes if it uses worker.Session)")
    _merge(job, "batch", args.batch, "--batch", where)
    _merge(job, "accum", args.accum, "--accum", where)
    _merge(job, "restart", args.restart, "--restart", where)


def check_limits_named(job: dict[str, Any], total: int) -> None:
    """--budget at or above total memory and --kill at or under the budget are errors naming the value."""
    try:
        budget = parse_budget(job["budget"], total)
    except SizeError as exc:
        raise UsageError(f"--budget {job['budget']}: {exc}") from None
    for option, default in (("kill", "110%"), ("warn", "85%")):
        try:
            value = parse_fraction_of(job.get(option, default), budget)
        except SizeError as exc:
            raise UsageError(f"--{option} {job.get(option)}: {exc}") from None
        if option == "kill" and value <= budget:
            raise UsageError(f"--kill {job.get(option)} ({format_bytes(value)}) is at or under the budget "
                             f"({format_bytes(budget)}): the kill ceiling must be above it, e.g. 110%")
        if option == "warn" and value > budget:
            raise UsageError(f"--warn {job.get(option)} ({format_bytes(value)}) is above the budget "
                             f"({format_bytes(budget)})")


def run_dir_of(state_dir: Path) -> Path:
    """The run dir of a one-line run with --state-dir: <state-dir>/run when its socket paths fit, else a short
    one under the platform's run dir named by a hash of the state dir."""
    candidate = state_dir / "run"
    if all(paths.socket_path_problem(candidate / sock) is None for sock in paths.IPC_SOCKETS):
        return candidate
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return paths.default_run_dir() / f"run-{digest}"

