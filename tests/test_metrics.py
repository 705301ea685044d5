"""GLUE metrics against hand-computed cases and independent numpy formulas."""

import numpy as np
import pytest

from gaml_jax import metrics, tasks


def _binary_counts(predictions, labels):
    tp = np.sum((predictions == 1) & (labels == 1))
    tn = np.sum((predictions == 0) & (labels == 0))
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    return tp, tn, fp, fn


def _average_ranks(x):
    """Ranks 1..n, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


@pytest.fixture
def binary():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    return predictions, labels


def test_hand_computed_binary_case():
    predictions = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 0, 1, 1, 0])
    # tp=2, tn=2, fp=1, fn=1.
    result = metrics.compute_metrics(["accuracy", "f1", "matthews_correlation"], predictions, labels)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert result["matthews_correlation"] == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))


def test_f1_is_precision_recall_harmonic_mean(binary):
    predictions, labels = binary
    tp, _, fp, fn = _binary_counts(predictions, labels)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert metrics.f1(predictions, labels) == pytest.approx(2 * precision * recall / (precision + recall))


def test_f1_without_any_positive_is_zero():
    assert metrics.f1(np.zeros(5, int), np.zeros(5, int)) == 0.0


def test_binary_matthews_formula(binary):
    predictions, labels = binary
    tp, tn, fp, fn = (float(c) for c in _binary_counts(predictions, labels))
    expected = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews_correlation(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_multiclass_matthews_is_correlation_of_one_hot_codes():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 3, 300))
    x = np.eye(3)[labels] - np.eye(3)[labels].mean(0)
    y = np.eye(3)[predictions] - np.eye(3)[predictions].mean(0)
    expected = np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
    assert metrics.matthews_correlation(predictions, labels) == pytest.approx(expected, abs=1e-12)


def test_matthews_of_constant_predictions_is_zero():
    assert metrics.matthews_correlation(np.ones(6, int), np.array([0, 1, 0, 1, 1, 0])) == 0.0


def test_correlations_against_numpy():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, 100).astype(float)  # Ties, as in STS-B's 0..5 scores.
    predictions = labels + rng.normal(0, 1.5, 100)
    result = metrics.compute_metrics(["pearson", "spearmanr"], predictions, labels)
    assert result["pearson"] == pytest.approx(np.corrcoef(predictions, labels)[0, 1], abs=1e-12)
    expected = np.corrcoef(_average_ranks(predictions), _average_ranks(labels))[0, 1]
    assert result["spearmanr"] == pytest.approx(expected, abs=1e-12)


def test_correlation_of_constant_predictions_is_nan():
    result = metrics.compute_metrics(["pearson", "spearmanr"], np.full(4, 2.0), np.array([0.0, 1, 2, 3]))
    assert np.isnan(result["pearson"]) and np.isnan(result["spearmanr"])


def test_zero_weights_leave_rows_out(binary):
    predictions, labels = binary
    weights = np.ones(len(labels))
    weights[-37:] = 0.0
    names = list(metrics.METRICS)
    weighted = metrics.compute_metrics(names, predictions, labels, weights)
    assert weighted == metrics.compute_metrics(names, predictions[:-37], labels[:-37])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown metric.*'acc'"):
        metrics.compute_metrics(["acc"], np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="same length"):
        metrics.compute_metrics(["accuracy"], np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="no examples"):
        metrics.compute_metrics(["accuracy"], np.zeros(3), np.zeros(3), np.zeros(3))


def test_main_score():
    scores = {"accuracy": 0.8, "f1": 0.7}
    assert tasks.main_score("mrpc", scores) == 0.7
    assert tasks.main_score(tasks.task_info("rt"), scores) == 0.8
    assert tasks.main_score("stsb", {"pearson": 0.5, "spearmanr": 0.6}) == 0.6
    with pytest.raises(KeyError, match="matthews_correlation"):
        tasks.main_score("cola", scores)
