"""A tiny BERT and a tiny learnable text task, for tests of the whole train / eval path.

Sentences are 3-10 words from a 95-word vocabulary; the label says whether the word "w7" occurs.
The model (4 layers of width 32) is random, saved with `gaml_jax.save_converted` so that
`load_pretrained` reads it without torch or the hub.
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from configs import default
from gaml_jax import ModelConfig, MultiExitBert, save_converted

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=2,
)


def make_checkpoint(folder: Path) -> Path:
    """A converted tiny BERT with its WordPiece tokenizer."""
    vocab = folder.parent / f"{folder.name}-vocab"
    vocab.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(TINY["vocab_size"] - 5)]
    (vocab / "vocab.txt").write_text("\n".join(tokens) + "\n")
    tokenizer = transformers.BertTokenizerFast(str(vocab / "vocab.txt"))
    config = ModelConfig(**TINY)
    params = MultiExitBert(config).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    save_converted(folder, config, jax.device_get(params), tokenizer)
    return folder


def make_task(folder: Path, num_train: int = 96, num_dev: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """train.csv and dev.csv with columns text,label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train", num_train), ("dev", num_dev)):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for i in range(n):
                words = [f"w{j}" for j in rng.integers(0, 20, rng.integers(3, 11))]
                if i % 2:  # half the sentences hold the cue word
                    words[rng.integers(len(words))] = "w7"
                else:
                    words = [w if w != "w7" else "w8" for w in words]
                writer.writerow([" ".join(words), int("w7" in words)])
        paths.append(path)
    return paths[0], paths[1]


def train_config(checkpoint: Path, train_file: Path, dev_file: Path, **train_overrides):
    """The default config pointed at the tiny model and task: batch 8 (one example per fake device)."""
    config = default.get_config()
    config.model.name = str(checkpoint)
    config.data.task = "csv"
    config.data.train_file = str(train_file)
    config.data.validation_file = str(dev_file)
    config.data.max_length = 16
    config.data.length_buckets = (16,)  # one shape: one compilation per test run
    config.data.length_group_batches = 0
    config.data.cache_dir = None
    t = config.train
    t.batch_size = 8
    t.eval_batch_size = 8
    t.learning_rate = 1e-3
    t.exit_learning_rate = 3e-3
    t.warmup_steps = 2
    t.num_train_steps = 6
    t.log_every = 2
    t.checkpoint_every = 2
    t.keep_checkpoints = 10
    for key, value in train_overrides.items():
        t[key] = value
    return config
