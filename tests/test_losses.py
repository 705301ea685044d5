"""gaml_jax.losses against plain numpy formulas (float64, loops over exits, pairs and examples)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaml_jax import losses

EXITS, BATCH, LABELS = 4, 6, 3
TEMPERATURE = 2.0
WEIGHTS = np.array([1, 1, 0, 1, 0, 1], np.float32)  # examples 2 and 4 are padding
RTOL, ATOL = 1e-5, 1e-6


def _logits(num_labels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=2.0, size=(EXITS, BATCH, num_labels)).astype(np.float32)


def _class_labels(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LABELS, size=BATCH).astype(np.int32)


def _targets(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=BATCH).astype(np.float32)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - z.max() - np.log(np.sum(np.exp(z - z.max())))


def _np_example_loss(logits: np.ndarray, label) -> float:
    """Loss of one example at one exit: CE, or squared error for one 'label' (regression)."""
    if logits.shape[-1] == 1:
        return (float(logits[0]) - float(label)) ** 2
    return -_np_log_softmax(logits)[label]


def _np_per_exit_ce(logits, labels, weights, normalizer):
    return np.array(
        [
            sum(weights[b] * _np_example_loss(logits[e, b], labels[b]) for b in range(logits.shape[1]))
            / normalizer
            for e in range(logits.shape[0])
        ]
    )


def _np_mutual_learning(logits, weights, temperature, normalizer):
    num_exits = logits.shape[0]
    total = 0.0
    for i in range(num_exits):
        for j in range(num_exits):
            if i == j:
                continue
            for b in range(logits.shape[1]):
                if logits.shape[-1] == 1:
                    pair = (float(logits[i, b, 0]) - float(logits[j, b, 0])) ** 2
                else:
                    log_q = _np_log_softmax(logits[i, b] / temperature)  # student
                    log_p = _np_log_softmax(logits[j, b] / temperature)  # teacher
                    pair = np.sum(np.exp(log_p) * (log_p - log_q)) * temperature**2
                total += weights[b] * pair
    return total / (num_exits * (num_exits - 1)) / normalizer


@pytest.mark.parametrize("kind, expected", [("layer", [2, 4, 6, 12]), ("uniform", [1, 1, 1, 1])])
def test_exit_weights(kind, expected):
    expected = np.array(expected, np.float64) / np.sum(expected)
    np.testing.assert_allclose(losses.exit_weights([2, 4, 6, 12], kind), expected, rtol=1e-6)


def test_exit_weights_unknown_kind_names_the_choices():
    with pytest.raises(ValueError, match="layer.*uniform"):
        losses.exit_weights([1, 2], "linear")


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_per_exit_ce_and_ce_loss_match_numpy(regression):
    logits = _logits(1 if regression else LABELS)
    labels = _targets() if regression else _class_labels()
    exit_weights = losses.exit_weights([3, 6, 9, 12], "layer")
    expected_per_exit = _np_per_exit_ce(logits, labels, WEIGHTS, WEIGHTS.sum())

    per_exit = jax.jit(losses.per_exit_ce)(logits, labels, WEIGHTS)
    loss = jax.jit(losses.ce_loss)(logits, labels, WEIGHTS, exit_weights)

    assert per_exit.shape == (EXITS,) and per_exit.dtype == jnp.float32
    np.testing.assert_allclose(per_exit, expected_per_exit, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loss, np.dot(exit_weights, expected_per_exit), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_mutual_learning_loss_matches_numpy(regression):
    logits = _logits(1 if regression else LABELS)
    expected = _np_mutual_learning(logits, WEIGHTS, TEMPERATURE, WEIGHTS.sum())
    loss = jax.jit(losses.mutual_learning_loss)(logits, WEIGHTS, TEMPERATURE)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


def test_padding_examples_do_not_count():
    logits, labels = _logits(LABELS), _class_labels()
    garbage = logits.copy()
    garbage[:, WEIGHTS == 0] = 50.0 * np.random.default_rng(3).normal(size=(EXITS, 2, LABELS))
    exit_weights = losses.exit_weights([1, 2, 3, 4], "uniform")
    for loss_fn in (
        lambda z: losses.ce_loss(z, labels, WEIGHTS, exit_weights),
        lambda z: losses.mutual_learning_loss(z, WEIGHTS, TEMPERATURE),
    ):
        np.testing.assert_allclose(loss_fn(garbage), loss_fn(logits), rtol=RTOL, atol=ATOL)


def test_global_normalizer_makes_shard_losses_sum_to_the_global_mean():
    logits, labels = _logits(LABELS), _class_labels()
    exit_weights = losses.exit_weights([1, 2, 3, 4], "layer")
    global_count = WEIGHTS.sum()
    for loss_fn, args in (
        (losses.ce_loss, lambda s: (logits[:, s], labels[s], WEIGHTS[s], exit_weights)),
        (losses.mutual_learning_loss, lambda s: (logits[:, s], WEIGHTS[s], TEMPERATURE)),
    ):
        halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
        summed = sum(loss_fn(*args(s), normalizer=global_count) for s in halves)
        np.testing.assert_allclose(summed, loss_fn(*args(slice(None))), rtol=RTOL, atol=ATOL)


def test_all_padding_batch_gives_zero_not_nan():
    zeros = np.zeros(BATCH, np.float32)
    logits = _logits(LABELS)
    assert float(losses.ce_loss(logits, _class_labels(), zeros, np.ones(EXITS))) == 0.0
    assert float(losses.mutual_learning_loss(logits, zeros, TEMPERATURE)) == 0.0


def test_mutual_learning_single_exit_is_zero():
    assert float(losses.mutual_learning_loss(_logits(LABELS)[:1], WEIGHTS, TEMPERATURE)) == 0.0


def test_mutual_learning_gradient_flows_only_through_students():
    """d/dz_i of sum_{j != i} T^2 KL(p_j || q_i) = T sum_{j != i} (q_i - p_j), teachers held fixed.

    Letting gradient through the teachers would add the terms where exit i is the teacher.
    """
    logits = _logits(LABELS)
    grad = jax.grad(losses.mutual_learning_loss)(logits, WEIGHTS, TEMPERATURE)

    z = logits.astype(np.float64) / TEMPERATURE
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [exits, batch, labels]
    expected = np.zeros_like(probs)
    for i in range(EXITS):
        for j in range(EXITS):
            if i != j:
                expected[i] += TEMPERATURE * (probs[i] - probs[j])
    expected *= WEIGHTS[None, :, None] / (EXITS * (EXITS - 1) * WEIGHTS.sum())
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_mutual_learning_regression_gradient_flows_only_through_students():
    """d/dpred_i of sum_{j != i} (pred_i - pred_j)^2 = 2 sum_{j != i} (pred_i - pred_j)."""
    logits = _logits(1)
    grad = jax.grad(losses.mutual_learning_loss)(logits, WEIGHTS, TEMPERATURE)
    preds = logits[..., 0].astype(np.float64)
    expected = 2.0 * (EXITS * preds - preds.sum(0, keepdims=True))
    expected *= WEIGHTS[None, :] / (EXITS * (EXITS - 1) * WEIGHTS.sum())
    np.testing.assert_allclose(grad[..., 0], expected, rtol=1e-4, atol=1e-7)


def test_bfloat16_logits_give_float32_losses():
    logits = _logits(LABELS).astype(jnp.bfloat16)
    exact = np.asarray(logits.astype(np.float32))  # the same values, widened
    loss = losses.mutual_learning_loss(logits, WEIGHTS, TEMPERATURE)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        loss, _np_mutual_learning(exact, WEIGHTS, TEMPERATURE, WEIGHTS.sum()), rtol=RTOL
    )
