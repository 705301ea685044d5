"""Exit criteria on the host: when may an example stop, what a threshold gives, and how to find one.

Three criteria decide, exit by exit, whether an example may stop (the deepest exit always answers):

* ``entropy`` (DeeBERT, Xin et al. 2020): exit when the prediction entropy, divided by
  ``log(num_labels)`` so that it lies in [0, 1], is strictly below the threshold.
* ``confidence``: exit when the largest softmax probability is at or above the threshold, in [0, 1].
* ``patience`` (PABEE, Zhou et al. 2020): the threshold is an integer patience ``t >= 1``. A counter
  starts at 0 at the first exit; at each later exit it grows by one when the prediction is unchanged
  from the previous exit and resets to 0 otherwise; the example exits once the counter reaches ``t``,
  i.e. once ``t + 1`` consecutive exits agree. For classification "unchanged" means the same argmax;
  for regression it means ``|value - previous value| < tolerance`` (in label units).

``CRITERIA`` is the table; ``exit_decisions`` and ``simulate`` apply a criterion to the logits of
every exit from one full forward pass (one forward gives every threshold's result: real early exit
predicts exactly what the full model's exit does), which ``find_threshold`` and
``sweep_thresholds`` use. The on-device runner that really stops is ``gaml_jax.early_exit``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from gaml_jax.config import ModelConfig
from gaml_jax.metrics import compute_metrics, predictions_from_logits
from gaml_jax.tasks import TaskInfo, main_score

# |change| below which a regression prediction counts as unchanged for patience (label units;
# STS-B scores span 0..5).
DEFAULT_REGRESSION_TOLERANCE = 0.1
# ----------------------------------------------------------------------------------------------
# Exit criteria: numpy functions on one exit's logits [batch, labels] (and, for patience, history).
# ----------------------------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def normalized_entropy(logits: np.ndarray) -> np.ndarray:
    """[..., labels] logits -> [...] prediction entropy / log(labels), in [0, 1]."""
    log_probs = _log_softmax(logits)  # <= 0, so the entropy is >= 0
    entropy = -(np.exp(log_probs) * log_probs).sum(axis=-1)
    return np.minimum(entropy / math.log(log_probs.shape[-1]), 1.0)


def max_probability(logits: np.ndarray) -> np.ndarray:
    """[..., labels] logits -> [...] largest softmax probability."""
    return np.exp(_log_softmax(logits).max(axis=-1))


class PatienceState(NamedTuple):
    prediction: np.ndarray  # [batch] argmax (classification) or value (regression) at the last exit
    count: np.ndarray  # [batch] how many consecutive exits left the prediction unchanged


def entropy_step(
    logits: np.ndarray, threshold: float, state: None, *, tolerance: float
) -> tuple[np.ndarray, None]:
    """Exit where the normalised entropy is strictly below ``threshold``."""
    del tolerance
    return normalized_entropy(logits) < threshold, state


def confidence_step(
    logits: np.ndarray, threshold: float, state: None, *, tolerance: float
) -> tuple[np.ndarray, None]:
    """Exit where the largest softmax probability is at or above ``threshold``."""
    del tolerance
    return max_probability(logits) >= threshold, state


def patience_step(
    logits: np.ndarray, threshold: int, state: PatienceState | None, *, tolerance: float
) -> tuple[np.ndarray, PatienceState]:
    """PABEE: exit once the prediction stayed unchanged at ``threshold`` consecutive exits.

    ``state`` is ``None`` at the first exit.
    """
    logits = np.asarray(logits)
    regression = logits.shape[-1] == 1
    prediction = logits[:, 0].astype(np.float64) if regression else logits.argmax(axis=-1)
    if state is None:
        count = np.zeros(prediction.shape, np.int64)
    else:
        if regression:
            unchanged = np.abs(prediction - state.prediction) < tolerance
        else:
            unchanged = prediction == state.prediction
        count = np.where(unchanged, state.count + 1, 0)
    return count >= threshold, PatienceState(prediction, count)


StepFn = Callable[..., tuple[np.ndarray, Any]]


@dataclasses.dataclass(frozen=True)
class Criterion:
    step: StepFn  # (logits [batch, labels], threshold, state, *, tolerance) -> (exits [batch], state)
    low: float  # valid thresholds: low <= threshold <= high
    high: float
    integer: bool  # thresholds are integers (patience)
    regression: bool  # applies to num_labels == 1
    looser_when_higher: bool  # a larger threshold lets examples exit earlier
    score: Callable[[np.ndarray], np.ndarray] | None = None  # what a continuous threshold compares to

    def describe(self) -> str:
        if self.integer:
            return f"an integer >= {int(self.low)}"
        return f"a number in [{self.low:g}, {self.high:g}]"


CRITERIA: dict[str, Criterion] = {
    "entropy": Criterion(
        entropy_step,
        low=0.0,
        high=1.0,
        integer=False,
        regression=False,
        looser_when_higher=True,
        score=normalized_entropy,
    ),
    "confidence": Criterion(
        confidence_step,
        low=0.0,
        high=1.0,
        integer=False,
        regression=False,
        looser_when_higher=False,
        score=max_probability,
    ),
    "patience": Criterion(
        patience_step, low=1, high=math.inf, integer=True, regression=True, looser_when_higher=False
    ),
}


def check_criterion(criterion: str, threshold: float, num_labels: int) -> tuple[Criterion, float | int]:
    """Checks (criterion, threshold) for a model with ``num_labels``; returns the table entry, threshold."""
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown exit criterion {criterion!r}; choose one of {sorted(CRITERIA)}.")
    crit = CRITERIA[criterion]
    if num_labels == 1 and not crit.regression:
        raise ValueError(
            f"The {criterion!r} criterion needs class probabilities and does not apply to regression "
            "(num_labels=1); use 'patience'."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise ValueError(f"The {criterion!r} threshold must be {crit.describe()}, got {threshold!r}.")
    if not crit.low <= threshold <= crit.high or (crit.integer and threshold != int(threshold)):
        raise ValueError(f"The {criterion!r} threshold must be {crit.describe()}, got {threshold!r}.")
    return crit, int(threshold) if crit.integer else float(threshold)


# ----------------------------------------------------------------------------------------------
# Simulation on the full model's logits, speed-up, threshold search.
# ----------------------------------------------------------------------------------------------


def exit_decisions(
    exit_logits: np.ndarray,
    criterion: str,
    threshold: float,
    *,
    tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
) -> np.ndarray:
    """[exits, batch, labels] logits of every exit -> [batch] index of the exit each example takes."""
    exit_logits = np.asarray(exit_logits)
    num_exits, batch, num_labels = exit_logits.shape
    crit, threshold = check_criterion(criterion, threshold, num_labels)
    exit_index = np.full(batch, num_exits - 1)  # The deepest exit always answers.
    running = np.ones(batch, bool)
    state = None
    for k in range(num_exits - 1):
        exits, state = crit.step(exit_logits[k], threshold, state, tolerance=tolerance)
        exit_index[running & exits] = k
        running &= ~exits
    return exit_index


def speedup_layers(layers_run: np.ndarray, num_layers: int) -> float:
    """``num_layers / mean(layers_run)``: the speed-up in encoder layers over running them all."""
    return num_layers / float(np.mean(layers_run))


def exit_counts(exit_index: np.ndarray, num_exits: int) -> np.ndarray:
    """[exits] how many examples left at each exit."""
    return np.bincount(np.asarray(exit_index), minlength=num_exits)


def find_threshold(
    exit_logits: np.ndarray,
    criterion: str,
    target_speedup: float,
    num_layers: int,
    exit_layers: tuple[int, ...],
    *,
    tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
) -> float | int:
    """The tightest threshold whose simulated layer speed-up is at least ``target_speedup``.

    Searches on ``exit_decisions`` (exits only move earlier as the threshold loosens, so the
    speed-up is monotone). For entropy/confidence "tightest" is up to the decisions: the result is
    the midpoint between the two consecutive observed scores (at non-final exits) that bound the
    tightest sufficient set of exits, so it does not hinge on the last bits of a logit.

    Args:
      exit_logits: [exits, batch, labels] logits of every exit (one full forward).
      criterion: a key of ``CRITERIA``.
      target_speedup: wanted ``num_layers / mean(layers_run)``, >= 1.
      num_layers: encoder layers of the model (``config.num_hidden_layers``).
      exit_layers: 1-based layer of each exit (``config.exits``).
      tolerance: the regression tolerance of ``patience``.

    Returns:
      The threshold (an int for patience).

    Raises:
      ValueError: if even the loosest threshold misses the target.
    """
    exit_logits = np.asarray(exit_logits)
    crit, _ = check_criterion(criterion, 1, exit_logits.shape[-1])
    if not target_speedup >= 1:
        raise ValueError(f"target_speedup must be >= 1, got {target_speedup}.")
    if crit.integer:
        candidates = np.arange(max(len(exit_layers) - 1, 1), 0, -1)  # tightest (largest) first
    else:
        # Between two consecutive observed scores every threshold makes the same decisions: the
        # midpoint stands for them all, and keeps real runs (whose logits differ from these in the
        # last bits) away from the edge. The tight end of the range stands for "never exit early".
        scores = np.unique(np.concatenate([[crit.low, crit.high], crit.score(exit_logits[:-1]).ravel()]))
        midpoints = (scores[1:] + scores[:-1]) / 2
        if crit.looser_when_higher:
            candidates = np.concatenate([[crit.low], midpoints])
        else:
            candidates = np.concatenate([[crit.high], midpoints[::-1]])
    exit_layers = np.asarray(exit_layers)

    def speedup(threshold) -> float:
        exit_index = exit_decisions(exit_logits, criterion, threshold, tolerance=tolerance)
        return speedup_layers(exit_layers[exit_index], num_layers)

    reached = lambda i: speedup(candidates[i]) >= target_speedup * (1 - 1e-9)  # float slack in the mean
    if not reached(len(candidates) - 1):
        raise ValueError(
            f"Target speed-up {target_speedup:g}x is unreachable with {criterion!r}: its loosest threshold "
            f"({candidates[-1]:g}) gives {speedup(candidates[-1]):.3f}x on these logits."
        )
    lo, hi = 0, len(candidates) - 1  # binary search for the first (tightest) candidate reaching it
    while lo < hi:
        mid = (lo + hi) // 2
        if reached(mid):
            hi = mid
        else:
            lo = mid + 1
    return int(candidates[lo]) if crit.integer else float(candidates[lo])


# Speed-ups whose exact thresholds every sweep includes (and its table reports).
SWEEP_TARGETS = (1.25, 1.5, 2.0, 3.0)


def sweep_thresholds(exit_logits: np.ndarray, criterion: str, num_points: int = 50) -> list[float]:
    """Thresholds from "never exit early" to "exit as early as possible" for a trade-off curve:
    every patience, or quantiles of the criterion's score at the non-final exits."""
    crit, _ = check_criterion(criterion, 1, exit_logits.shape[-1])
    if crit.integer:
        return [int(p) for p in range(max(exit_logits.shape[0] - 1, 1), 0, -1)]
    scores = crit.score(exit_logits[:-1]).ravel()
    grid = np.quantile(scores, np.linspace(0, 1, num_points))
    grid = np.unique(np.clip(np.concatenate([[crit.low, crit.high], grid]), crit.low, crit.high))
    return [float(t) for t in (grid if crit.looser_when_higher else grid[::-1])]


def simulate(
    exit_logits: np.ndarray,
    labels: np.ndarray,
    criterion: str,
    threshold: float,
    *,
    task: TaskInfo,
    config: ModelConfig,
) -> dict[str, float]:
    """Score and layer speed-up of a threshold, from the full model's logits of every exit.

    Real early exit predicts exactly what the full model's exit does (tests/test_early_exit.py),
    so a sweep need not re-run the model for each threshold.
    """
    exit_index = exit_decisions(exit_logits, criterion, threshold)
    logits = np.take_along_axis(exit_logits, exit_index[None, :, None], axis=0)[0]
    metrics = compute_metrics(task.metrics, predictions_from_logits(logits), labels)
    layers_run = np.asarray(config.exits)[exit_index]
    return {
        "score": main_score(task, metrics),
        "mean_layers": float(np.mean(layers_run)),
        "speedup_layers": speedup_layers(layers_run, config.num_hidden_layers),
    }
