"""GAML-BERT's losses over the exits of a multi-exit model.

Every exit is trained with cross-entropy (``ce_loss``) and, for mutual learning, distils from
every other exit (``mutual_learning_loss``). All functions take ``exit_logits`` shaped
``[exits, batch, labels]``; ``labels == 1`` means regression, whose prediction is
``exit_logits[..., 0]``. The maths is float32 whatever the logits' dtype.

Padding examples carry weight 0. Losses are sums over examples divided by ``normalizer``, the
number of real examples the loss is averaged over: a data-parallel caller passes the *global*
count, so that the per-device losses add up to the global mean (no average of averages).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

EXIT_WEIGHTINGS = ("layer", "uniform")


def exit_weights(exit_layers: Sequence[int], kind: str) -> np.ndarray:
    """Weights of the exits in the CE loss, normalised to sum to 1.

    Args:
      exit_layers: 1-based layer number of each exit.
      kind: ``"layer"``: the exit after layer ``l`` weighs ``l`` (the weighting of PABEE and
        GAML-BERT: deeper exits count more); ``"uniform"``: all exits weigh the same.

    Returns:
      float32 array ``[exits]`` summing to 1.
    """
    layers = np.asarray(exit_layers, dtype=np.float64)
    if layers.ndim != 1 or layers.size == 0 or np.any(layers < 1):
        raise ValueError(f"exit_layers must be a non-empty list of 1-based layers, got {exit_layers!r}")
    if kind == "layer":
        weights = layers
    elif kind == "uniform":
        weights = np.ones_like(layers)
    else:
        raise ValueError(f"Unknown exit weighting {kind!r}; choose one of {EXIT_WEIGHTINGS}")
    return (weights / weights.sum()).astype(np.float32)


def _normalizer(weights: Array, normalizer: Array | float | None) -> Array:
    normalizer = jnp.sum(weights) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    # A batch of padding only (normalizer 0) has a zero loss sum: return 0, not NaN.
    return jnp.where(normalizer > 0, normalizer, 1.0)


def _is_regression(exit_logits: Array) -> bool:
    return exit_logits.shape[-1] == 1


def _per_example_ce(exit_logits: Array, labels: Array) -> Array:
    """[exits, batch, labels] -> [exits, batch] cross-entropy (squared error for regression)."""
    logits = exit_logits.astype(jnp.float32)
    if _is_regression(logits):
        return jnp.square(logits[..., 0] - labels.astype(jnp.float32)[None, :])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    label_index = jnp.broadcast_to(labels.astype(jnp.int32)[None, :, None], log_probs.shape[:-1] + (1,))
    return -jnp.take_along_axis(log_probs, label_index, axis=-1)[..., 0]


def per_exit_ce(
    exit_logits: Array, labels: Array, weights: Array, normalizer: Array | float | None = None
) -> Array:
    """Each exit's masked mean CE (MSE for regression).

    Args:
      exit_logits: ``[exits, batch, labels]``.
      labels: ``[batch]`` int class ids, or float targets for regression.
      weights: ``[batch]`` 1 for real examples, 0 for padding.
      normalizer: number of real examples to average over; default ``weights.sum()``.

    Returns:
      float32 ``[exits]``.
    """
    weights = weights.astype(jnp.float32)
    losses = _per_example_ce(exit_logits, labels)  # [exits, batch]
    return jnp.sum(losses * weights[None, :], axis=-1) / _normalizer(weights, normalizer)


def ce_loss(
    exit_logits: Array,
    labels: Array,
    weights: Array,
    exit_weights: Array | np.ndarray,
    normalizer: Array | float | None = None,
) -> Array:
    """CE (MSE for regression) at every exit, combined as a weighted mean over exits.

    Args:
      exit_logits: ``[exits, batch, labels]``.
      labels: ``[batch]`` int class ids, or float targets for regression.
      weights: ``[batch]`` 1 for real examples, 0 for padding.
      exit_weights: ``[exits]`` weight of each exit, e.g. from ``exit_weights(...)``.
      normalizer: number of real examples to average over; default ``weights.sum()``.

    Returns:
      float32 scalar.
    """
    per_exit = per_exit_ce(exit_logits, labels, weights, normalizer)
    exit_weights = jnp.asarray(exit_weights, jnp.float32)
    return jnp.sum(exit_weights * per_exit) / jnp.sum(exit_weights)


def mutual_learning_loss(
    exit_logits: Array, weights: Array, temperature: float, normalizer: Array | float | None = None
) -> Array:
    """Mutual learning: every exit (student) distils from every other exit (teacher).

    For each ordered pair (student i, teacher j), i != j, the loss is
    ``T^2 KL(softmax(z_j / T) || softmax(z_i / T))`` (for regression ``(pred_i - pred_j)^2``),
    with the teacher under ``stop_gradient``: each exit learns from the others without being
    pulled towards its students. Averaged over the ``E (E - 1)`` pairs and over real examples.

    Args:
      exit_logits: ``[exits, batch, labels]``.
      weights: ``[batch]`` 1 for real examples, 0 for padding.
      temperature: softmax temperature ``T`` (unused for regression).
      normalizer: number of real examples to average over; default ``weights.sum()``.

    Returns:
      float32 scalar; 0 for a single exit.
    """
    logits = exit_logits.astype(jnp.float32)
    num_exits = logits.shape[0]
    weights = weights.astype(jnp.float32)
    if _is_regression(logits):
        preds = logits[..., 0]  # [exits, batch]
        teachers = jax.lax.stop_gradient(preds)
        pair_losses = jnp.square(preds[:, None, :] - teachers[None, :, :])  # [student, teacher, batch]
    else:
        student_log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)  # [exits, batch, labels]
        teacher_log_probs = jax.lax.stop_gradient(student_log_probs)
        teacher_probs = jnp.exp(teacher_log_probs)
        # KL(p_j || q_i) = sum_l p_j (log p_j - log q_i), broadcast to [student, teacher, batch, labels].
        kl = teacher_probs[None] * (teacher_log_probs[None] - student_log_probs[:, None])
        pair_losses = jnp.sum(kl, axis=-1) * temperature**2  # [student, teacher, batch]
    # The diagonal (an exit teaching itself) is zero in value and gradient; masking makes it exact.
    off_diagonal = 1.0 - jnp.eye(num_exits, dtype=jnp.float32)
    total = jnp.sum(pair_losses * off_diagonal[:, :, None] * weights[None, None, :])
    num_pairs = max(num_exits * (num_exits - 1), 1)
    return total / (num_pairs * _normalizer(weights, normalizer))
