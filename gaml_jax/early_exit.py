"""Early-exit inference: exit criteria, their simulation on full logits, and a real layer-by-layer runner.

Three criteria decide, exit by exit, whether an example may stop (the deepest exit always answers):

* ``entropy`` (DeeBERT, Xin et al. 2020): exit when the prediction entropy, divided by
  ``log(num_labels)`` so that it lies in [0, 1], is strictly below the threshold.
* ``confidence``: exit when the largest softmax probability is at or above the threshold, in [0, 1].
* ``patience`` (PABEE, Zhou et al. 2020): the threshold is an integer patience ``t >= 1``. A counter
  starts at 0 at the first exit; at each later exit it grows by one when the prediction is unchanged
  from the previous exit and resets to 0 otherwise; the example exits once the counter reaches ``t``,
  i.e. once ``t + 1`` consecutive exits agree. For classification "unchanged" means the same argmax;
  for regression it means ``|value - previous value| < tolerance`` (in label units).

``exit_decisions`` applies a criterion to logits of every exit from one full forward pass (cheap:
one forward gives every threshold's result, which is what ``find_threshold`` and sweeps use).
``EarlyExitRunner`` really stops: it runs the model layer by layer, asks the host once per exit
layer which examples may leave, and keeps computing only the others, gathered into a smaller batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from gaml_jax.model import MultiExitBert

PyTree = Any

# |change| below which a regression prediction counts as unchanged for patience (label units;
# STS-B scores span 0..5).
DEFAULT_REGRESSION_TOLERANCE = 0.1
# Batch sizes the runner compiles for; a batch is padded up to the next one. Beyond the largest,
# a batch runs at its own size. Powers of two and 1.5x powers of two (1, 2, 3, 4, 6, 8, 12, ...,
# 512) bound the padding to a third of a batch: at BERT-base shapes, batch 32 and a 2x layer
# speed-up, powers of two alone turned 0.78 of the layer speed-up into wall clock, these 0.88.
# Buckets cost few compilations, since all layers share one compiled function per bucket.
DEFAULT_BATCH_BUCKETS = tuple(sorted({2**i for i in range(10)} | {3 * 2**i for i in range(8)}))


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


# ----------------------------------------------------------------------------------------------
# Real early exit.
# ----------------------------------------------------------------------------------------------


class ExitResult(NamedTuple):
    logits: np.ndarray  # [batch, labels] float32 logits of the exit each example took
    exit_index: np.ndarray  # [batch] 0-based exit
    layers_run: np.ndarray  # [batch] encoder layers computed for the example


class EarlyExitRunner:
    """Runs a ``MultiExitBert`` layer by layer and stops computing examples once they exit.

    The embedding, a layer without an exit, and a layer fused with its exit are separate jitted
    functions, each compiled once per (batch bucket, sequence length) and shared by all layers
    (they differ only in their weights, which are arguments). At an exit layer
    the exit's logits come to the host (the one host sync of that layer), the criterion decides,
    and the examples still running are gathered on the device, with one gather, into the
    smallest bucket that holds them (padded by repeating a running row), when that bucket is
    smaller than the current one. At batch size 1 the model simply stops at its exit layer.

    Example::

      runner = EarlyExitRunner(model, params)
      result = runner.run(batch, "entropy", 0.3)
      speedup_layers(result.layers_run, model.config.num_hidden_layers)
    """

    def __init__(
        self,
        model: MultiExitBert,
        params: PyTree,
        *,
        batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS,
    ):
        cfg = model.config
        buckets = sorted({int(b) for b in batch_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"batch_buckets must be positive batch sizes, got {batch_buckets}.")
        self.model, self.config, self.batch_buckets = model, cfg, tuple(buckets)
        params = jax.device_put(params)
        self.params = params
        self._exit_of_layer = {layer - 1: k for k, layer in enumerate(cfg.exits)}  # 0-based layer -> exit
        # Every encoder layer has the same structure, and so has every exit: each is applied as
        # layer 0 (exit 0) with its own weights, so one compiled function serves all layers
        # (exits) of a batch bucket. Each call also flattens only the small pytree it needs.
        self._embed_params = {"embeddings": params["embeddings"]}
        self._layer_params = [{"layer_0": params[f"layer_{i}"]} for i in range(cfg.num_hidden_layers)]
        pooler = lambda k: "pooler" if cfg.shared_pooler else f"pooler_{k}"
        self._exit_params = [
            {"classifier_0": params[f"classifier_{k}"]}
            | ({pooler(0): params[pooler(k)]} if cfg.exit_pooler_dense else {})
            for k in range(cfg.num_exits)
        ]

        def embed(p, input_ids, token_type_ids, attention_mask):
            hidden = model.apply({"params": p}, input_ids, token_type_ids, True, method=MultiExitBert.embed)
            return hidden, attention_mask  # brings the mask to the device in the same call

        def layer(p, hidden, attention_mask):
            return model.apply({"params": p}, 0, hidden, attention_mask, True, method=MultiExitBert.layer)

        def layer_exit(p, exit_p, hidden, attention_mask):
            hidden = layer(p, hidden, attention_mask)
            # The mask (compacted with the hidden state) keeps mean pooling to the real tokens.
            logits = model.apply(
                {"params": exit_p}, 0, hidden, attention_mask, True, method=MultiExitBert.exit
            )
            return hidden, logits

        def compact(hidden, attention_mask, rows):
            return hidden[rows], attention_mask[rows]

        def full(p, input_ids, attention_mask, token_type_ids):
            return model.apply({"params": p}, input_ids, attention_mask, token_type_ids, True).logits

        self._embed = jax.jit(embed)
        # The hidden state is donated: each layer writes its output over its input.
        self._layer = jax.jit(layer, donate_argnums=1)
        self._layer_exit = jax.jit(layer_exit, donate_argnums=2)
        self._compact = jax.jit(compact)
        self._full = jax.jit(full)

    def bucket(self, n: int) -> int:
        """The batch size ``n`` running examples are padded to."""
        for b in self.batch_buckets:
            if b >= n:
                return b
        return n

    def full_forward(self, batch: Mapping[str, Any]) -> jax.Array:
        """All layers and exits in one fused jit: [exits, batch, labels] logits (the clock baseline)."""
        input_ids, attention_mask, token_type_ids = _inputs(batch)
        return self._full(self.params, input_ids, attention_mask, token_type_ids)

    def run(
        self,
        batch: Mapping[str, Any],
        criterion: str,
        threshold: float,
        *,
        tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
    ) -> ExitResult:
        """Early-exit inference on ``batch``: ``input_ids`` [batch, seq], optional ``attention_mask``
        and ``token_type_ids``; numpy or JAX arrays."""
        cfg = self.config
        crit, threshold = check_criterion(criterion, threshold, cfg.num_labels)
        input_ids, attention_mask, token_type_ids = _inputs(batch)
        n = input_ids.shape[0]
        if n == 0:
            raise ValueError("run() needs a batch of at least one example.")
        size = self.bucket(n)
        if size > n:
            pad = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])  # padding repeats row 0
            input_ids, attention_mask, token_type_ids = (
                input_ids[pad],
                attention_mask[pad],
                token_type_ids[pad],
            )
        hidden, mask = self._embed(self._embed_params, input_ids, token_type_ids, attention_mask)

        logits_out = np.zeros((n, cfg.num_labels), np.float32)
        exit_index = np.zeros(n, np.int64)
        running = np.arange(n)  # examples still running ...
        rows = np.arange(n)  # ... and their rows in the device batch
        state = None
        last_exit = cfg.num_exits - 1
        for i in range(cfg.num_hidden_layers):
            k = self._exit_of_layer.get(i)
            if k is None:
                hidden = self._layer(self._layer_params[i], hidden, mask)
                continue
            hidden, logits = self._layer_exit(self._layer_params[i], self._exit_params[k], hidden, mask)
            logits = np.asarray(logits)[rows]  # the host sync of this exit layer
            if k == last_exit:
                exits = np.ones(len(running), bool)
            else:
                exits, state = crit.step(logits, threshold, state, tolerance=tolerance)
            logits_out[running[exits]] = logits[exits]
            exit_index[running[exits]] = k
            if exits.all():
                break
            stay = ~exits
            running, rows = running[stay], rows[stay]
            state = jax.tree.map(lambda a, keep=stay: a[keep], state)
            new_size = self.bucket(len(running))
            if new_size < size:
                gather = np.concatenate([rows, np.full(new_size - len(rows), rows[0])])
                hidden, mask = self._compact(hidden, mask, gather)
                rows, size = np.arange(len(running)), new_size
        layers_run = np.asarray(cfg.exits)[exit_index]
        return ExitResult(logits_out, exit_index, layers_run)


def _inputs(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    input_ids = np.asarray(batch["input_ids"], np.int32)
    attention_mask = batch.get("attention_mask")
    token_type_ids = batch.get("token_type_ids")
    attention_mask = (
        np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    )
    token_type_ids = (
        np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
    )
    return input_ids, attention_mask, token_type_ids
