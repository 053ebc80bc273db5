"""The built-in job: a small byte-level causal transformer language model trained on local text.

Training is free functions taking their dependencies as arguments (as in mlx-lm's trainer). The data for
step ``s`` is a pure function of ``(seed, s)``, so a resumed run sees exactly the batches an uninterrupted
one would, whatever the split into micro-batches.
"""

from __future__ import annotations

import dataclasses
import sysconfig
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

VOCAB = 256
_MAX_CORPUS_BYTES = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of the language model."""

    dim: int = dataclasses.field(default=64, metadata={"help": "embedding width"})
    layers: int = dataclasses.field(default=2, metadata={"help": "transformer blocks"})
    heads: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    context: int = dataclasses.field(default=64, metadata={"help": "tokens (bytes) per sample"})


class ByteLM(nn.Module):
    """Pre-norm causal transformer over bytes."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, config.dim)
        self.position = nn.Embedding(config.context, config.dim)
        self.blocks = [
            nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, norm_first=True)
            for _ in range(config.layers)
        ]
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, VOCAB)

    def __call__(self, tokens: mx.array) -> mx.array:
        length = tokens.shape[1]
        hidden = self.embed(tokens) + self.position(mx.arange(length))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(length)
        for block in self.blocks:
            hidden = block(hidden, mask)
        return self.head(self.norm(hidden))  # type: ignore[no-any-return]


def default_corpus_paths() -> list[Path]:
    """The standard library's own .py sources: text every Python install has, no download needed."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.glob("*.py") if p.is_file())


def load_corpus(source: str = "", limit: int = _MAX_CORPUS_BYTES) -> mx.array:
    """Bytes of a file, of every file under a directory, or of the stdlib sources when ``source`` is empty."""
    if source:
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"training data {source!r} does not exist")
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    else:
        paths = default_corpus_paths()
    chunks: list[bytes] = []
    size = 0
    for path in paths:
        data = path.read_bytes()[: limit - size]
        chunks.append(data)
        size += len(data)
        if size >= limit:
            break
    corpus = b"".join(chunks)
    if len(corpus) < 2 * 1024:
        raise ValueError(f"training data {source or 'stdlib'!r} holds {len(corpus)} bytes; need at least 2 KiB")
    return mx.array(memoryview(corpus), dtype=mx.uint8)  # type: ignore[arg-type]  # buffers work; stubs lag


def step_batch(corpus: mx.array, seed: int, step: int, samples: int, context: int) -> mx.array:
    """The ``samples`` x ``context+1`` token windows of optimizer step ``step`` (0-based)."""
    key = mx.random.key((seed * 1_000_003 + step) % (2**63))
    starts = mx.random.randint(0, corpus.shape[0] - context - 1, (samples, 1), key=key)
    return corpus[starts + mx.arange(context + 1)].astype(mx.int32)


def loss_fn(model: ByteLM, tokens: mx.array) -> mx.array:
    """Mean next-byte cross entropy."""
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()  # type: ignore[no-any-return]


GradFn = Callable[[ByteLM, mx.array], tuple[mx.array, dict[str, object]]]


def accumulated_grads(
    grad_fn: GradFn, model: ByteLM, tokens: mx.array, micro_batch: int
) -> tuple[mx.array, dict[str, object]]:
    """Loss and gradients over ``tokens`` in micro-batches of ``micro_batch``, averaged."""
    from mlx.utils import tree_map

    chunks = tokens.shape[0] // micro_batch
    total_loss: mx.array = mx.array(0.0)
    total: dict[str, object] | None = None
    for index in range(chunks):
        loss, grads = grad_fn(model, tokens[index * micro_batch : (index + 1) * micro_batch])
        total_loss = total_loss + loss
        total = grads if total is None else tree_map(mx.add, total, grads)
        if chunks > 1:
            mx.eval(total_loss, total)  # bound the graph to one micro-batch at a time
    assert total is not None  # chunks >= 1 by construction (accum >= 1)
    if chunks == 1:
        return total_loss, total
    return total_loss / chunks, tree_map(lambda g: g / chunks, total)
