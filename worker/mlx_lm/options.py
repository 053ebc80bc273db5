"""Options of ``python -m worker.mlx_lm``: mlx_lm.lora's own (0.32.x), importable without MLX or mlx-lm.

The daemon validates ``[jobs.NAME.mlx_lm]`` tables with this module and builds the worker's argv from them;
the worker parses the same argv. Precedence is mlx_lm.lora's: command line, then the ``-c/--config`` YAML file,
then mlx_lm.lora's defaults. Unlike mlx_lm.lora, an unknown or conflicting option (or YAML key) is an error
naming it, and abbreviated options are not accepted.

Extensions (mlx_lm.lora reads these from its YAML file only): ``--lr-schedule``, ``--lora-parameters`` and
``--optimizer-config`` take JSON; ``--steps-per-save`` is another name for ``--save-every`` (mlx-lm's trainer
calls it so); ``--checkpoint-dir`` checkpoints a standalone run (the daemon sets it for a supervised one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROG = "python -m worker.mlx_lm"
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")


class OptionError(ValueError):
    """A bad option, value or YAML key; the message starts with the option's name."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its mlx-lm name, how its value is read, mlx_lm.lora's default and help."""

    name: str
    kind: str  # str | int | float | flag | size | json
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    short: str = ""
    cli: bool = True  # False: a key of the YAML file only (as in mlx_lm.lora)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _o(name: str, kind: str, default: Any, help: str, **kw: Any) -> Option:
    return Option(name, kind, default, help, **kw)


OPTIONS: tuple[Option, ...] = (
    _o("model", "str", "Qwen/Qwen3-0.6b", "local model directory or Hugging Face repo"),
    _o("train", "flag", False, "accepted for compatibility: worker.mlx_lm always trains"),
    _o("data", "str", "mlx-community/WikiSQL", "directory with {train,valid,test}.jsonl or a Hugging Face dataset"),
    _o("fine_tune_type", "str", "lora", "lora, dora or full", choices=("lora", "dora", "full")),
    _o("optimizer", "str", "adam", "optimizer", choices=OPTIMIZERS),
    _o("mask_prompt", "flag", False, "mask the prompt in the loss (chat and completions data)"),
    _o("num_layers", "int", 16, "layers to fine-tune, from the last; -1: all"),
    _o("batch_size", "int", 4, "micro-batch size (the daemon may shrink it, raising accumulation)"),
    _o("iters", "int", 1000, "micro-batch iterations; optimizer steps = iters // grad_accumulation_steps"),
    _o("val_batches", "int", 25, "validation batches; -1: the whole validation set"),
    _o("learning_rate", "float", 1e-5, "learning rate (when no lr_schedule)"),
    _o("steps_per_report", "int", 10, "iterations between training-loss lines on stdout"),
    _o("steps_per_eval", "int", 200, "iterations between validations"),
    _o("grad_accumulation_steps", "int", 1, "micro-batches per optimizer update"),
    _o("resume_adapter_file", "str", None, "adapter weights to start a fresh run from"),
    _o("adapter_path", "str", "adapters", "where adapters.safetensors and adapter_config.json are written"),
    _o("save_every", "int", 100, "iterations between adapter saves ({it:07d}_adapters.safetensors)"),
    _o("steps_per_save", "int", None, "another name for save_every"),
    _o("test", "flag", False, "evaluate on the test set after training"),
    _o("test_batches", "int", 500, "test batches; -1: the whole test set"),
    _o("max_seq_length", "int", 2048, "longer sequences are truncated"),
    _o("config", "str", None, "YAML file of options, as mlx_lm.lora -c takes it", short="-c"),
    _o("grad_checkpoint", "flag", False, "gradient checkpointing (less memory, more compute)"),
    _o("clear_cache_threshold", "size", 0, "clear MLX's cache after a micro-batch when it exceeds this "
       "(bytes, or 500M / 2GB); the job's cache_clear overrides it when supervised"),
    _o("report_to", "str", None, "not supported: the same curves come from mlxsupd "
       "(mlxsupctl tail -f JOB telemetry, or the dashboard)"),
    _o("project_name", "str", None, "accepted for compatibility (used with report_to only)"),
    _o("seed", "int", 0, "seed of LoRA initialisation, data order and dropout"),
    _o("trust_remote_code", "flag", False, "let the tokenizer/model run code from the model repo"),
    _o("lr_schedule", "json", None, "learning-rate schedule: {name, arguments, warmup, warmup_init}"),
    _o("lora_parameters", "json", {"rank": 8, "dropout": 0.0, "scale": 20.0}, "LoRA rank, dropout, scale, keys"),
    _o("optimizer_config", "json", {o: {} for o in OPTIMIZERS}, "extra arguments per optimizer name"),
    _o("checkpoint_dir", "str", None, "checkpoint here when run without mlxsupd (exact resume)"),
    _o("hf_dataset", "json", None, "Hugging Face dataset collection", cli=False),
    _o("text_feature", "str", None, "key of the text in text data", cli=False),
    _o("prompt_feature", "str", None, "key of the prompt in completions data", cli=False),
    _o("completion_feature", "str", None, "key of the completion in completions data", cli=False),
    _o("chat_feature", "str", None, "key of the messages in chat data", cli=False),
)
BY_NAME = {o.name: o for o in OPTIONS}
AT_LEAST_ONE = ("batch_size", "iters", "grad_accumulation_steps", "max_seq_length", "save_every",
                "steps_per_report", "steps_per_eval")
PATHS = ("config", "adapter_path", "resume_adapter_file", "checkpoint_dir")  # always local paths
MAYBE_PATHS = ("model", "data")  # a local path when it exists, else a Hugging Face name


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise OptionError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m worker.mlx_lm`` (every default None: unset options fall through)."""
    parser = _Parser(prog=PROG, allow_abbrev=False, argument_default=None,
                     description="Fine-tune with mlx-lm (LoRA, DoRA or full) under mlxsupd, with exact resume. "
                                 "Takes mlx_lm.lora's options.")
    for option in OPTIONS:
        if not option.cli:
            continue
        flags = [f for f in (option.short, option.flag) if f]
        if option.kind == "flag":
            parser.add_argument(*flags, dest=option.name, action="store_true", default=None, help=option.help)
        else:
            parser.add_argument(*flags, dest=option.name, type=_READERS[option.kind], choices=option.choices or None,
                                metavar=option.name.upper(), help=option.help)
    return parser


def parse_size(text: str) -> int:
    """mlx-lm's size syntax: digits with an optional M, G, MB or GB suffix (powers of 1000)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(|M|G|MB|GB)\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (digits with M, G, MB or GB)")
    scale = {"": 1, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


_READERS: dict[str, Any] = {"str": str, "int": int, "float": float, "size": parse_size, "json": _json}


def parse(argv: list[str]) -> types.SimpleNamespace:
    """Parse the command line, merge the YAML file and the defaults, validate; OptionError names the problem."""
    return resolve(given(argv))


def given(argv: list[str]) -> dict[str, Any]:
    """The options set on the command line or in its YAML file (command line first), without defaults."""
    cli = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    yaml_values = read_yaml(Path(cli["config"])) if cli.get("config") else {}
    return {**yaml_values, **cli}


def resolve(given: Mapping[str, Any]) -> types.SimpleNamespace:
    """Fill in defaults and check the combination (the namespace mlx-lm's own functions expect)."""
    given = dict(given)
    if "steps_per_save" in given:
        save = given.pop("steps_per_save")
        if given.get("save_every", save) != save:
            raise OptionError(f"steps_per_save = {save} conflicts with save_every = {given['save_every']} "
                              "(two names for one option)")
        given["save_every"] = save
    values = {o.name: given.get(o.name, o.default) for o in OPTIONS if o.name != "steps_per_save"}
    values = {k: v for k, v in values.items() if v is not None or BY_NAME[k].cli}  # YAML-only keys only when set
    _check(values)
    return types.SimpleNamespace(**values)


def _check(values: dict[str, Any]) -> None:
    for name in AT_LEAST_ONE:
        if values[name] < 1:
            raise OptionError(f"{name} = {values[name]}: must be at least 1")
    for name in ("num_layers", "val_batches", "test_batches"):
        if values[name] < -1:
            raise OptionError(f"{name} = {values[name]}: must be -1 or more")
    if values["clear_cache_threshold"] < 0:
        raise OptionError(f"clear_cache_threshold = {values['clear_cache_threshold']}: must be 0 or more")
    if values["iters"] < values["grad_accumulation_steps"]:
        raise OptionError(f"iters = {values['iters']} is less than grad_accumulation_steps = "
                          f"{values['grad_accumulation_steps']}: no optimizer step would be taken")
    if values["report_to"]:
        raise OptionError(f"report_to = {values['report_to']!r}: not supported by {PROG}; the same curves (loss, "
                          "validation loss, tokens/s, memory per step) come from the daemon: `mlxsupctl tail -f JOB "
                          "telemetry` streams them as JSON lines (also in the job's telemetry.jsonl), and "
                          "`mlxsupctl dashboard` shows them live where it is installed")
    schedule = values["lr_schedule"]
    if schedule is not None and not (isinstance(schedule, dict) and isinstance(schedule.get("name"), str)
                                     and isinstance(schedule.get("arguments"), list)):
        raise OptionError(f"lr_schedule = {schedule!r}: expected a table with 'name' and a list 'arguments'")
    lora = values["lora_parameters"]
    if not isinstance(lora, dict) or not {"rank", "scale", "dropout"} <= set(lora):
        raise OptionError(f"lora_parameters = {lora!r}: expected a table with rank, scale and dropout")
    if not isinstance(values["optimizer_config"], dict):
        raise OptionError(f"optimizer_config = {values['optimizer_config']!r}: expected a table")


def read_yaml(path: Path) -> dict[str, Any]:
    """The options of a YAML file as mlx_lm.lora -c reads them (1e-5 is a float), checked key by key."""
    try:
        import yaml
    except ImportError:
        raise OptionError(f"config: reading {path} needs PyYAML, which mlx-lm brings: "
                          "pip install 'mlx-supervisor[mlx-lm]'") from None
    try:
        loaded = yaml.load(path.read_text(), _yaml_loader(yaml))  # a SafeLoader subclass: no arbitrary objects
    except OSError as exc:
        raise OptionError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise OptionError(f"config: {path} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise OptionError(f"config: {path} must hold a mapping of options, got {type(loaded).__name__}")
    return {key: check_value(key, value, f" in {path}") for key, value in loaded.items() if key != "config"}


def check_value(key: Any, value: Any, where: str = "") -> Any:
    """One option's value from YAML or TOML: known name, right type; returns it (ints accepted as floats)."""
    option = BY_NAME.get(str(key))
    if option is None or not isinstance(key, str):
        raise OptionError(f"{key}: unknown option{where}; known: {', '.join(sorted(BY_NAME))}")
    expected: tuple[type[Any], ...] = {
        "str": (str,), "int": (int,), "float": (int, float), "flag": (bool,), "size": (int, str),
        "json": (dict, list)}[option.kind]
    if value is None and option.kind in ("str", "json"):
        return value
    if (isinstance(value, bool) and option.kind != "flag") or not isinstance(value, expected):
        raise OptionError(f"{key} = {value!r}{where}: expected {'/'.join(t.__name__ for t in expected)}")
    if option.choices and value not in option.choices:
        raise OptionError(f"{key} = {value!r}{where}: expected one of {', '.join(option.choices)}")
    if option.kind == "size" and isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise OptionError(f"{key}{where}: {exc}") from None
    return float(value) if option.kind == "float" else value


def _yaml_loader(yaml: Any) -> Any:
    """A SafeLoader that reads 1e-5 as a float, like mlx_lm.lora's (without changing yaml.SafeLoader itself)."""

    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                     |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                     |\.[0-9_]+(?:[eE][-+][0-9]+)?
                     |[-+]?\.(?:inf|Inf|INF)
                     |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return Loader


def to_argv(table: Mapping[str, Any]) -> list[str]:
    """Command-line arguments for a table of options (a config's ``mlx_lm`` table); OptionError names a bad
    key. YAML-only keys belong in the ``config`` file. A false flag is left out."""
    argv: list[str] = []
    for key, raw in table.items():
        value = check_value(key, raw, " in the mlx_lm table")
        option = BY_NAME[key]
        if not option.cli:
            raise OptionError(f"{key}: set it in the YAML file named by 'config' (as with mlx_lm.lora)")
        if option.kind == "flag":
            argv += [option.flag] if value else []
        elif value is not None:
            argv += [option.flag, json.dumps(value) if option.kind == "json" else str(value)]
    return argv


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """What a ``[jobs.NAME.mlx_lm]`` table means for its job: the table with absolute paths, batch and accum."""

    table: dict[str, Any]
    batch: int
    accum: int


def configure_job(table: Mapping[str, Any], job: Mapping[str, Any], base: Path,
                  cache_clear: int | None) -> JobOptions:
    """Check an ``mlx_lm`` table against the rest of its job's raw table (``job``); relative paths are made
    absolute from ``base`` (the config file's directory). ``cache_clear``: the job's cache_clear in bytes when
    set. Reads the YAML file named by ``config``. OptionError names the conflicting keys."""
    from worker.mlx_lm.requirement import require

    for key in ("command", "train"):
        if key in job:
            raise OptionError(f"'{key}' and 'mlx_lm' are both set: a job runs one kind of worker; remove one")
    if job.get("sdk") is False:
        raise OptionError("'sdk = false' and 'mlx_lm' are both set: the mlx-lm worker reports through the Session "
                          "SDK; remove sdk")
    if "checkpoint_dir" in table:
        raise OptionError("mlx_lm.checkpoint_dir is set by the supervisor: use the job's checkpoint_dir")
    resolved = {key: _absolute(key, value, base) for key, value in table.items()}
    try:
        options = given(to_argv(resolved))
        args = resolve(options)
    except OptionError as exc:
        raise OptionError(f"mlx_lm.{exc}") from None
    for key, name in (("batch", "batch_size"), ("accum", "grad_accumulation_steps")):
        if key in job and job[key] != getattr(args, name):
            raise OptionError(f"{key} = {job[key]} conflicts with mlx_lm.{name} = {getattr(args, name)}: "
                              f"an mlx_lm job's {key} is its {name}; remove {key}")
    threshold = options.get("clear_cache_threshold")
    if cache_clear is not None and threshold is not None and threshold != cache_clear:
        raise OptionError(f"cache_clear ({cache_clear} bytes) conflicts with mlx_lm.clear_cache_threshold "
                          f"({threshold} bytes): set one of them")
    require()
    return JobOptions(resolved, args.batch_size, args.grad_accumulation_steps)


def _absolute(key: str, value: Any, base: Path) -> Any:
    """A path option relative to ``base``; model and data only when that path exists (else a hub name)."""
    if not isinstance(value, str) or not value or (key not in PATHS and key not in MAYBE_PATHS):
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if key in PATHS or (base / path).exists():
        return str((base / path).resolve())
    return value
