"""Exit criteria against numpy loops straight from their definitions; threshold search."""

from __future__ import annotations

import numpy as np
import pytest

from gaml_jax.criteria import CRITERIA, exit_decisions, find_threshold, speedup_layers

# ---------------------------------------------------------------------------- numpy references


def reference_decisions(exit_logits, criterion, threshold, tolerance=0.1):
    """One example and one exit at a time, straight from the definitions."""
    num_exits, batch, num_labels = exit_logits.shape
    out = []
    for b in range(batch):
        taken, count, previous = num_exits - 1, 0, None
        for k in range(num_exits - 1):
            z = exit_logits[k, b].astype(np.float64)
            if criterion == "patience":
                prediction = z[0] if num_labels == 1 else int(np.argmax(z))
                if previous is not None:
                    same = (
                        abs(prediction - previous) < tolerance if num_labels == 1 else prediction == previous
                    )
                    count = count + 1 if same else 0
                previous = prediction
                stop = count >= threshold
            else:
                p = np.exp(z - z.max())
                p /= p.sum()
                if criterion == "entropy":
                    stop = -np.sum(p * np.log(p)) / np.log(num_labels) < threshold
                else:
                    stop = p.max() >= threshold
            if stop:
                taken = k
                break
        out.append(taken)
    return np.array(out)


def random_exit_logits(seed, num_exits=5, batch=64, num_labels=3, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((num_exits, batch, num_labels)) * scale).astype(np.float32)


@pytest.mark.parametrize(
    "criterion,thresholds",
    [
        ("entropy", [0.0, 0.3, 0.6, 0.9, 1.0]),
        ("confidence", [0.4, 0.6, 0.8, 0.95, 1.0]),
        ("patience", [1, 2, 3]),
    ],
)
@pytest.mark.parametrize("num_labels", [2, 3])
def test_criteria_match_numpy_reference(criterion, thresholds, num_labels):
    exit_logits = random_exit_logits(0, num_labels=num_labels)
    for threshold in thresholds:
        np.testing.assert_array_equal(
            exit_decisions(exit_logits, criterion, threshold),
            reference_decisions(exit_logits, criterion, threshold),
        )


@pytest.mark.parametrize("tolerance", [0.05, 0.5])
def test_regression_patience_matches_numpy_reference(tolerance):
    rng = np.random.default_rng(1)
    # A slowly drifting score: some steps change it by less than the tolerance, some by more.
    exit_logits = np.cumsum(rng.standard_normal((6, 64, 1)) * 0.3, axis=0).astype(np.float32)
    for patience in (1, 2, 3):
        np.testing.assert_array_equal(
            exit_decisions(exit_logits, "patience", patience, tolerance=tolerance),
            reference_decisions(exit_logits, "patience", patience, tolerance),
        )


@pytest.mark.parametrize(
    "criterion,tight_to_loose",
    [
        ("entropy", np.linspace(0.0, 1.0, 21)),
        ("confidence", np.linspace(1.0, 0.3, 21)),
        ("patience", [5, 4, 3, 2, 1]),
    ],
)
def test_speedup_grows_as_threshold_loosens(criterion, tight_to_loose):
    exit_logits = random_exit_logits(2, num_exits=6, num_labels=2, batch=200)
    exit_layers = np.array([1, 2, 3, 4, 5, 6])
    speedups = [
        speedup_layers(exit_layers[exit_decisions(exit_logits, criterion, t)], 6) for t in tight_to_loose
    ]
    assert np.all(np.diff(speedups) >= 0), speedups
    assert speedups[0] == 1.0 and speedups[-1] > 1.5


@pytest.mark.parametrize("criterion", ["entropy", "confidence", "patience"])
def test_find_threshold_reaches_target_and_is_tightest(criterion):
    exit_logits = random_exit_logits(3, num_exits=6, num_labels=2, batch=200)
    exit_layers = (2, 4, 6, 8, 10, 12)
    layers = np.array(exit_layers)
    speedup = lambda t: speedup_layers(layers[exit_decisions(exit_logits, criterion, t)], 12)
    threshold = find_threshold(exit_logits, criterion, 1.6, 12, exit_layers)
    assert speedup(threshold) >= 1.6
    decisions = exit_decisions(exit_logits, criterion, threshold)
    if criterion == "entropy":
        tighter = [t for t in np.linspace(0, 1, 1001) if t < threshold]
    elif criterion == "confidence":
        tighter = [t for t in np.linspace(0, 1, 1001) if t > threshold]
    else:
        assert isinstance(threshold, int)
        tighter = list(range(threshold + 1, 7))
    # A tighter threshold misses the target or makes the very same decisions.
    for t in tighter:
        assert speedup(t) < 1.6 or np.array_equal(exit_decisions(exit_logits, criterion, t), decisions)
    assert any(speedup(t) < 1.6 for t in tighter)


def test_find_threshold_unreachable_target():
    exit_logits = random_exit_logits(4, num_exits=3, num_labels=2)
    with pytest.raises(ValueError, match="unreachable"):
        find_threshold(exit_logits, "patience", 2.9, 3, (1, 2, 3))  # would need every example at exit 0


def test_bad_criterion_and_threshold():
    exit_logits = random_exit_logits(5, num_labels=2)
    with pytest.raises(ValueError, match="confidence"):
        exit_decisions(exit_logits, "margin", 0.5)
    for criterion, threshold, valid in [
        ("entropy", 1.5, r"\[0, 1\]"),
        ("entropy", -0.1, r"\[0, 1\]"),
        ("confidence", 1.01, r"\[0, 1\]"),
        ("confidence", float("nan"), r"\[0, 1\]"),
        ("patience", 0, "integer >= 1"),
        ("patience", 1.5, "integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=valid):
            exit_decisions(exit_logits, criterion, threshold)
    regression = random_exit_logits(5, num_labels=1)
    for criterion in ("entropy", "confidence"):
        with pytest.raises(ValueError, match="patience"):
            exit_decisions(regression, criterion, 0.5)
    with pytest.raises(ValueError, match=">= 1"):
        find_threshold(exit_logits, "entropy", 0.5, 5, (1, 2, 3, 4, 5))
    assert sorted(CRITERIA) == ["confidence", "entropy", "patience"]
