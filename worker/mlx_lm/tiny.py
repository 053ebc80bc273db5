"""``python -m worker.mlx_lm.tiny OUT``: a tiny Llama model, its tokenizer and a text dataset, built offline.

For tests, the demo and the benchmark: nothing is downloaded. ``OUT/model`` is a directory ``mlx_lm.load``
accepts (config.json, model.safetensors, tokenizer files); ``OUT/data`` holds ``train.jsonl``, ``valid.jsonl``
and ``test.jsonl`` of ``{"text": ...}`` sentences of varying length (so micro-batches differ in tokens).
Everything is a pure function of the seed, so two builds are identical.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the old man", "a child", "the teacher", "our cook"]
VERBS = ["sees", "likes", "finds", "paints", "follows", "calls", "feeds", "watches"]
OBJECTS = ["the ball", "a red apple", "the river", "a small house", "the moon", "some bread", "the green door"]
TAILS = ["", "today", "at night", "in the garden", "with great care", "near the old bridge", "again and again"]
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
MODEL_ARGS = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}


def sentences(count: int, rng: random.Random) -> list[str]:
    """``count`` sentences of one to three clauses, so lengths vary from about 5 to 30 tokens."""
    out = []
    for _ in range(count):
        clauses = [" ".join(filter(None, (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS),
                                          rng.choice(TAILS)))) for _ in range(rng.randint(1, 3))]
        out.append(" and ".join(clauses))
    return out


def vocabulary() -> list[str]:
    words = {w for phrase in SUBJECTS + VERBS + OBJECTS + TAILS for w in phrase.split()}
    return SPECIALS + sorted(words | {"and"})


def write_data(out: Path, seed: int, train: int = 200, valid: int = 40, test: int = 40) -> None:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("valid", valid), ("test", test)):
        lines = [json.dumps({"text": s}) for s in sentences(count, rng)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(out))


def write_model(out: Path, seed: int) -> None:
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_config, save_model

    config = {**MODEL_ARGS, "vocab_size": len(vocabulary()), "eos_token_id": vocabulary().index("</s>")}
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")


def build(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out/model`` and ``out/data``; return both paths."""
    model_dir, data_dir = out / "model", out / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    write_model(model_dir, seed)
    write_tokenizer(model_dir)
    write_data(data_dir, seed)
    return model_dir, data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.mlx_lm.tiny", description=__doc__)
    parser.add_argument("out", type=Path, help="directory to write model/ and data/ into")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and sentences (default: 0)")
    args = parser.parse_args(argv)
    model_dir, data_dir = build(args.out, args.seed)
    print(f"model: {model_dir}\ndata: {data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
