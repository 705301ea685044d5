"""A workdir as train.py leaves it, for the tiny model of tests/tiny.py, written without training.

The run's metadata and checkpoint go through train.py's own writers (``write_run_metadata``,
``Checkpointer``). The exit classifiers are redrawn so that each exit's prediction and confidence vary
across inputs and early exit takes every exit somewhere (a random tiny BERT's exits all sit
near the uniform distribution).
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import numpy as np

from gaml_jax import data as data_lib
from gaml_jax import names
from gaml_jax.checkpoints import Checkpointer, write_run_metadata
from gaml_jax.weights import load_pretrained, load_tokenizer
from tests import tiny

# The redrawn exit classifiers weigh the nearly constant [CLS] state by ~10^3, so float32
# rounding in the encoder (1e-7, differing between two compiled forms of it) shows in the exits'
# logits at ~1e-4: logits and probabilities of this run agree to this, predictions exactly.
LOGIT_ATOL = 1e-3


def make_pair_task(folder: Path, num_rows: int = 24, seed: int = 1) -> tuple[Path, Path]:
    """train.csv and dev.csv with columns first,second,label (label: the texts share a word)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("train", "dev"):
        path = folder / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["first", "second", "label"])
            for _ in range(num_rows):
                a, b = ([f"w{j}" for j in rng.integers(0, 20, rng.integers(2, 7))] for _ in range(2))
                writer.writerow([" ".join(a), " ".join(b), int(bool(set(a) & set(b)))])
        paths.append(path)
    return paths[0], paths[1]


def make_workdir(
    workdir: Path,
    checkpoint: Path,
    train_file: Path,
    dev_file: Path,
    *,
    pair: bool = False,
    **model_overrides,
) -> Path:
    """A workdir holding the tiny model (exit classifiers redrawn) at step 6, best by score;
    ``model_overrides`` are ``ModelConfig`` fields (e.g. ``exit_pooling="mean"``)."""
    config = tiny.train_config(checkpoint, train_file, dev_file)
    if pair:
        config.data.text_columns = ("first", "second")
    tokenizer = load_tokenizer(checkpoint)
    task, splits = data_lib.load_task(config.data, tokenizer)
    model, params = load_pretrained(checkpoint, num_labels=task.num_labels, **model_overrides)
    params = jax.tree.map(np.asarray, params)
    # Exit classifiers redrawn so that every exit's prediction and confidence vary with the input
    # (the [CLS] state of a random BERT barely does): scaled to a logit spread of about 2 over the
    # dev examples, and centred on them.
    rng = np.random.default_rng(3)
    for k in range(model.config.num_exits):
        classifier = params[names.classifier(k)]
        classifier["kernel"] = rng.normal(0, 1, classifier["kernel"].shape).astype(np.float32)
        classifier["bias"] = np.zeros_like(classifier["bias"])
    split = splits[task.eval_splits[0]]
    batch = next(data_lib.eval_batches(split, split.num_examples, buckets=(16,), max_length=16))
    logits = np.asarray(
        model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits
    )  # [exits, N, labels], with zero biases
    for k in range(model.config.num_exits):
        scale = 2.0 / (logits[k] - logits[k].mean(0)).std()  # spread across examples
        params[names.classifier(k)]["kernel"] *= scale
        params[names.classifier(k)]["bias"] = -scale * logits[k].mean(0)
    write_run_metadata(
        workdir, model_config=model.config, task=task, run_config=config.to_dict(), tokenizer=tokenizer
    )
    checkpointer = Checkpointer(workdir)
    checkpointer.save(6, params, {"count": np.zeros((), np.int32)}, score=0.5)
    checkpointer.close()
    return workdir
