"""Every exit's predictions on a split and their scores: the evaluation training runs each epoch.

Like an evaluator of big_vision, it is handed a predict function and knows nothing of the trainer:
``make_predict_fn`` builds the jitted forward, ``predict_exits`` runs it over padded eval batches
(dropping the padding, gathering across processes), ``exit_scores`` scores every exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gaml_jax.metrics import compute_metrics, predictions_from_logits
from gaml_jax.model import MultiExitBert

PyTree = Any


def make_predict_fn(model: MultiExitBert):
    """Jitted deterministic forward: batch -> [exits, batch, labels] logits."""

    @jax.jit
    def predict(params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
        return model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            deterministic=True,
        ).logits

    return predict


def predict_exits(
    predict_fn, params: PyTree, batches: Iterable[dict[str, np.ndarray]], put=None
) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``predict_fn`` over padded eval batches; drops the padding examples.

    ``put`` places a host batch on the devices (e.g. sharded over a mesh); with several
    processes the per-process outputs are gathered. Returns ([exits, N, labels], labels [N]).
    """
    logits, labels = [], []
    for batch in batches:
        device_batch = put(batch) if put is not None else {k: jnp.asarray(v) for k, v in batch.items()}
        out = predict_fn(
            params, {k: device_batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        )
        keep = batch["weights"] > 0
        out_host = np.asarray(
            multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1 else out
        )
        if jax.process_count() > 1:
            keep = np.asarray(multihost_utils.process_allgather(keep, tiled=True))
            batch_labels = np.asarray(multihost_utils.process_allgather(batch["labels"], tiled=True))
        else:
            batch_labels = batch["labels"]
        logits.append(out_host[:, keep])
        labels.append(batch_labels[keep])
    return np.concatenate(logits, axis=1), np.concatenate(labels)


def exit_scores(metric_names, exit_logits: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """The task's metrics for every exit: one dict per exit."""
    return [compute_metrics(metric_names, predictions_from_logits(z), labels) for z in exit_logits]
