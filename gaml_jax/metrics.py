"""GLUE metrics on the host, in numpy/scipy: accuracy, binary F1, Matthews correlation, Pearson, Spearman.

They need every prediction of a split at once (F1, MCC and the correlations are not means of
per-batch values), so evaluation gathers predictions to the host and calls `compute_metrics`.
Which metrics each task reports, and which one is its main score, is in the task table of
`gaml_jax.tasks` (`TaskInfo.metrics`, `TaskInfo.main_metric`, `main_score`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.stats


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predicted class ids equal to the label."""
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1 (MRPC, QQP); 0.0 when there is no positive at all."""
    predicted = predictions == 1
    actual = labels == 1
    tp = np.sum(predicted & actual)
    fp = np.sum(predicted & ~actual)
    fn = np.sum(~predicted & actual)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_correlation(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA), in its multi-class form; 0.0 when it is undefined.

    From the confusion matrix C (rows true, columns predicted) with n examples, c of them
    correct, t = row sums and p = column sums:
    (c n - p.t) / sqrt((n^2 - p.p) (n^2 - t.t)). For two classes this is the binary MCC.
    """
    classes, inverse = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n = len(labels)
    true_ids, pred_ids = inverse[:n], inverse[n:]
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1.0)
    t = confusion.sum(axis=1)
    p = confusion.sum(axis=0)
    c = np.trace(confusion)
    denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float((c * n - p @ t) / denominator) if denominator else 0.0


def _is_constant(x: np.ndarray) -> bool:
    return bool(np.all(x == x[0]))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation (STS-B); NaN when either side is constant (it is undefined)."""
    if _is_constant(predictions) or _is_constant(labels):
        return float("nan")
    return float(scipy.stats.pearsonr(predictions, labels).statistic)


def spearmanr(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (STS-B, ties get their average rank); NaN when either side is constant."""
    if _is_constant(predictions) or _is_constant(labels):
        return float("nan")
    return float(scipy.stats.spearmanr(predictions, labels).statistic)


# The names follow the GLUE metric of HF `evaluate`, so logged results compare directly.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearmanr,
}
_CORRELATIONS = ("pearson", "spearmanr")


def compute_metrics(
    metric_names: Sequence[str],
    predictions: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Computes the named metrics over a whole split.

    Args:
      metric_names: names from `METRICS`, e.g. `TaskInfo.metrics`.
      predictions: [N] class ids, or floats for regression.
      labels: [N] class ids, or floats for regression.
      weights: optional [N]; rows whose weight is 0 (the padding of the last eval batch) are
        left out, the others count once.

    Returns:
      {name: value} in the order of `metric_names`.
    """
    unknown = [name for name in metric_names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or predictions.shape != labels.shape:
        raise ValueError(
            f"predictions {predictions.shape} and labels {labels.shape} must be 1-D of the same length "
            "(take the argmax of logits first)"
        )
    if weights is not None:
        weights = np.asarray(weights)
        if weights.shape != labels.shape:
            raise ValueError(f"weights {weights.shape} do not match labels {labels.shape}")
        keep = weights > 0
        predictions, labels = predictions[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError("no examples to score (every weight is 0 or the split is empty)")
    results = {}
    for name in metric_names:
        if name in _CORRELATIONS:
            results[name] = METRICS[name](predictions.astype(np.float64), labels.astype(np.float64))
        else:
            results[name] = METRICS[name](predictions, labels)
    return results


def predictions_from_logits(logits: np.ndarray) -> np.ndarray:
    """[..., labels] logits -> class ids, or the regression value where there is one label."""
    logits = np.asarray(logits)
    return logits[..., 0] if logits.shape[-1] == 1 else logits.argmax(-1)
