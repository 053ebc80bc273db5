"""Model, datasets, optimizer and adapter files, built with mlx-lm's own functions as ``mlx_lm.lora`` does.

Pinned to mlx-lm 0.32.x (``requirement.REQUIREMENT``): ``load``, ``load_dataset``, ``CacheDataset``,
``linear_to_lora_layers``, ``build_schedule`` and ``save_config`` are called with 0.32's signatures.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import types
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.tuner.datasets import CacheDataset, load_dataset
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import load, save_config

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_OPTIMIZERS: dict[str, Any] = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
                               "adafactor": optim.Adafactor}


# What mlx-lm and transformers import lazily on a first load whatever the model: numpy's RNG (the data order),
# transformers' image, video and config-validation helpers (on AutoTokenizer's path). Imported ahead so that a
# standby has them; only the model's own architecture modules (named by its config) are left for after "go".
IMPORTED_AHEAD = ("numpy.random", "transformers.image_utils", "transformers.video_utils",
                  "transformers.image_transforms", "transformers.utils.type_validators")


def import_ahead() -> None:
    """Import IMPORTED_AHEAD (each one this transformers has); reads no file of the run's."""
    for name in IMPORTED_AHEAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def load_model(args: types.SimpleNamespace) -> tuple[nn.Module, Any]:
    """The base model and its tokenizer (``mlx_lm.utils.load``: a local directory or a Hugging Face repo)."""
    trust = bool(args.trust_remote_code)
    model, tokenizer = load(args.model, tokenizer_config={"trust_remote_code": trust}, trust_remote_code=trust)
    return model, tokenizer


def load_data(args: types.SimpleNamespace, tokenizer: Any) -> tuple[CacheDataset, CacheDataset, CacheDataset]:
    """Train, validation and test sets (``mlx_lm.tuner.datasets.load_dataset``), tokenised lazily."""
    namespace = types.SimpleNamespace(**{**vars(args), "train": True})
    train, valid, test = load_dataset(namespace, tokenizer)
    return CacheDataset(train), CacheDataset(valid), CacheDataset(test)


def prepare(model: nn.Module, args: types.SimpleNamespace) -> None:
    """Freeze the model and make the fine-tuned part trainable, as ``mlx_lm.lora.train_model`` does."""
    mx.random.seed(args.seed)  # LoRA's initial weights; a resumed run overwrites them from its checkpoint
    model.freeze()
    layers = model.layers
    if args.num_layers > len(layers):
        raise ValueError(f"num_layers = {args.num_layers}, but the model has only {len(layers)} layers")
    if args.fine_tune_type == "full":
        for layer in layers[-max(args.num_layers, 0):]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, args.num_layers, args.lora_parameters, use_dora=args.fine_tune_type == "dora")


def build_optimizer(args: types.SimpleNamespace) -> optim.Optimizer:
    """The optimizer ``mlx_lm.lora`` builds: its name, per-optimizer config, and a schedule or constant rate."""
    rate = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    extra = dict(args.optimizer_config.get(args.optimizer, {}) or {})
    return _OPTIMIZERS[args.optimizer](learning_rate=rate, **extra)


def adapter_dir(args: types.SimpleNamespace) -> Path:
    path = Path(args.adapter_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_adapter_config(args: types.SimpleNamespace) -> None:
    """``adapter_config.json`` with the options, which ``mlx_lm.generate``/``fuse`` read to rebuild the layers."""
    config = {k: v for k, v in vars(args).items() if k != "checkpoint_dir"}
    config["train"] = True  # as mlx_lm.lora writes it when training (this worker always trains)
    config["lora_parameters"] = None if args.fine_tune_type == "full" else args.lora_parameters
    target = adapter_dir(args) / ADAPTER_CONFIG
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    save_config(config, tmp)
    os.replace(tmp, target)


def save_adapters(model: nn.Module, args: types.SimpleNamespace, iteration: int | None) -> None:
    """Write the trainable parameters to ``adapters.safetensors`` (and ``{iteration:07d}_adapters.safetensors``
    when ``iteration`` is given), each atomically, so a kill mid-write never leaves a torn adapter file."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    directory = adapter_dir(args)
    names = [ADAPTERS] + ([f"{iteration:07d}_{ADAPTERS}"] if iteration is not None else [])
    for name in names:
        tmp = directory / f".{name}.tmp{os.getpid()}.safetensors"  # mx appends .safetensors when missing
        mx.save_safetensors(str(tmp), weights)
        os.replace(tmp, directory / name)
