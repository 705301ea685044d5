"""Early-exit evaluation of a trained run (eval.py): real early exit scored and timed against all
layers, and threshold sweeps simulated on the full model's logits, with their tables and plots.

The per-exit evaluation that training runs each epoch is ``gaml_jax.evaluator``."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gaml_jax import data as data_lib
from gaml_jax.checkpoints import RUN_CONFIG_FILE, TOKENIZER_DIR, load_trained
from gaml_jax.criteria import (
    CRITERIA,
    SWEEP_TARGETS,
    exit_counts,
    find_threshold,
    simulate,
    speedup_layers,
    sweep_thresholds,
)
from gaml_jax.early_exit import EarlyExitRunner
from gaml_jax.metrics import compute_metrics, predictions_from_logits
from gaml_jax.model import MultiExitBert
from gaml_jax.tasks import TaskInfo, main_score

PyTree = Any


def agreement(early: np.ndarray, full: np.ndarray, dtype: str = "float32") -> float:
    """The fraction of examples whose early-exit logits ``early`` [N, labels] predict what the full
    model's logits ``full`` at the exit taken predict: the same class, or for regression the same
    value up to rounding (the two run different programs on different batch compositions), within
    ``regression_tolerance(dtype)`` relative and absolute."""
    if early.shape[-1] == 1:
        tol = regression_tolerance(dtype)
        return float(np.mean(np.isclose(early[:, 0], full[:, 0], rtol=tol, atol=tol)))
    return float(np.mean(early.argmax(-1) == full.argmax(-1)))


def regression_tolerance(dtype: str) -> float:
    """sqrt(eps) of the compute dtype: 3e-4 in float32, 0.09 in bfloat16; rounding stays far below."""
    return float(np.sqrt(jnp.finfo(dtype).eps))


# ----------------------------------------------------------------------------------------------
# Early-exit evaluation of a trained run (eval.py).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EarlyExitReport:
    """What early exit at one threshold gives on one split (the keys of ``eval.py --json``)."""

    metric: str  # the task's main metric
    score: float  # its value with early exit
    threshold: float
    criterion: str
    mean_layers: float  # encoder layers run per example, on average
    speedup_layers: float  # layers of the model / mean_layers
    # The median over timed passes of all layers' time over early exit's (None: not measured).
    speedup_measured: float | None
    exit_counts: list[int]  # examples that left at each exit
    # Fraction of predictions equal to the full model's at the exit taken (1.0); for regression,
    # equal up to rounding (``regression_tolerance``).
    agreement: float
    metrics: dict[str, float]  # every metric of the task, with early exit
    full_metrics: dict[str, float]  # the same, all layers (deepest exit)
    split: str
    num_examples: int
    seconds_early: float | None  # median of the timed passes over the split
    seconds_full: float | None  # the faster of all layers fused and all layers one by one

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def real_rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Eval batches without their weight-0 padding rows (the runner computes every row it gets)."""
    for batch in batches:
        keep = batch["weights"] > 0
        yield {k: v[keep] for k, v in batch.items()}


def run_early_exit(
    runner: EarlyExitRunner,
    batches: list[dict[str, np.ndarray]],
    criterion: str,
    threshold: float,
    *,
    task: Any,
    split: str,
    exit_logits: np.ndarray | None = None,
    measure: bool = True,
    timing_repeats: int = 3,
    progress: bool = True,
) -> EarlyExitReport:
    """Early exit over ``batches`` (padding rows removed), scored and timed against all layers.

    A first pass of each (early exit, then all layers and exits in one fused function,
    ``runner.full_forward``) gives the predictions and compiles every batch and length bucket;
    ``exit_logits`` ([exits, N, labels], from ``all_exit_logits`` on the same batches) spares the
    second.
    With ``measure``, early exit and two all-layers baselines (the fused forward, and the
    layer-by-layer runner with no exit) then run ``timing_repeats`` more times over the same
    batches, alternating. Each repeat's speed-up is the faster baseline's time over early exit's;
    the report gives the median over repeats.
    """
    config = runner.config
    labels = np.concatenate([b["labels"] for b in batches])
    results = []
    bar = tqdm(batches, desc=f"early exit ({criterion} {threshold:g})", unit="batch", disable=not progress)
    for batch in bar:
        results.append(runner.run(batch, criterion, threshold))
    exit_index = np.concatenate([r.exit_index for r in results])
    layers_run = np.concatenate([r.layers_run for r in results])
    logits = np.concatenate([r.logits for r in results])
    if exit_logits is None:
        exit_logits = all_exit_logits(runner, batches, progress=progress)
    full = exit_logits  # [exits, N, labels]
    # What the full model's exit predicts for each example at the exit it took.
    at_exit = full[exit_index, np.arange(len(exit_index))]
    agreed = agreement(logits, at_exit, config.dtype)
    seconds_early = seconds_full = speedup_measured = None
    if measure:
        # The all-layers baseline is the faster of the fused forward and the layer-by-layer
        # runner with exits that never fire (a patience no run reaches): on some backends one
        # large program is slower than the per-layer ones, and that must not pass for a speed-up.
        never = ("patience", 10**9)
        for batch in batches:  # compiles the never-exit path of every shape
            runner.run(batch, *never)
        times: dict[str, list[float]] = {"early": [], "fused": [], "layerwise": []}
        for _ in tqdm(range(timing_repeats), desc="timing", unit="pass", disable=not progress):
            for name, fn in (
                ("early", lambda b: runner.run(b, criterion, threshold)),  # host arrays: synchronised
                ("fused", lambda b: jax.block_until_ready(runner.full_forward(b))),
                ("layerwise", lambda b: runner.run(b, *never)),
            ):
                start = time.perf_counter()
                for batch in batches:
                    fn(batch)
                times[name].append(time.perf_counter() - start)
        # Per repeat, the faster baseline over early exit; the median over repeats resists the
        # bursts of load that shared machines have.
        full_times = np.minimum(times["fused"], times["layerwise"])
        ratios = full_times / np.asarray(times["early"])
        seconds_early, seconds_full = float(np.median(times["early"])), float(np.median(full_times))
        speedup_measured = float(np.median(ratios))
    metrics = compute_metrics(task.metrics, predictions_from_logits(logits), labels)
    full_metrics = compute_metrics(task.metrics, predictions_from_logits(full[-1]), labels)
    return EarlyExitReport(
        metric=task.main_metric,
        score=main_score(task, metrics),
        threshold=float(threshold),
        criterion=criterion,
        mean_layers=float(np.mean(layers_run)),
        speedup_layers=speedup_layers(layers_run, config.num_hidden_layers),
        speedup_measured=speedup_measured,
        exit_counts=[int(c) for c in exit_counts(exit_index, config.num_exits)],
        agreement=agreed,
        metrics=metrics,
        full_metrics=full_metrics,
        split=split,
        num_examples=int(len(labels)),
        seconds_early=seconds_early,
        seconds_full=seconds_full,
    )


@dataclasses.dataclass
class TrainedRun:
    """A training run's workdir, loaded for evaluation: model, parameters and its task's data."""

    workdir: str
    name: str  # for plots and tables: the workdir's name and the training method
    model: MultiExitBert
    params: PyTree
    step: int
    task: TaskInfo
    splits: dict[str, Any]  # split name -> data.EncodedSplit
    data_config: dict[str, Any]


def load_run(workdir: str, which: str = "best") -> TrainedRun:
    """Loads the ``best`` (or ``latest``) checkpoint of a run and re-reads its task's splits with
    the tokenizer saved in the workdir. Raises FileNotFoundError naming the fix if there is none."""
    from transformers import AutoTokenizer  # imported here: slow, and training does not need it

    model, params, step = load_trained(workdir, which)
    root = Path(workdir).absolute()
    run_config = json.loads((root / RUN_CONFIG_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
    task, splits = data_lib.load_task(run_config["data"], tokenizer)
    method = run_config.get("train", {}).get("method", "?")
    return TrainedRun(
        str(root), f"{root.name} ({method})", model, params, step, task, splits, run_config["data"]
    )


def split_batches(run: TrainedRun, split: str, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The split's real examples in order, in batches of at most ``batch_size``, padded only in
    length (to the run's length buckets). Names the available splits if ``split`` is not one."""
    if split not in run.splits:
        raise ValueError(
            f"Split {split!r} does not exist for task {run.task.name!r}; choose one of {sorted(run.splits)} "
            "with --split."
        )
    encoded = run.splits[split]
    labels = encoded.labels
    if (labels < 0).all() if labels.dtype.kind == "i" else np.isnan(labels).all():
        raise ValueError(f"Split {split!r} has no labels to score against; choose a labelled split.")
    cfg = run.data_config
    batches = data_lib.eval_batches(
        encoded, batch_size, buckets=tuple(cfg["length_buckets"]), max_length=cfg["max_length"]
    )
    return list(real_rows(batches))


def all_exit_logits(runner: EarlyExitRunner, batches, *, progress: bool = True) -> np.ndarray:
    """[exits, N, labels] logits of every exit for the batches' examples (one full forward each)."""
    out = [
        np.asarray(runner.full_forward(b))
        for b in tqdm(batches, desc="all exits", unit="batch", disable=not progress)
    ]
    return np.concatenate(out, axis=1)


def sweep_run(
    run: TrainedRun, split: str, *, criteria: Iterable[str], batch_size: int, progress: bool = True
) -> list[dict[str, Any]]:
    """Score against layer speed-up for a grid of thresholds of each applicable criterion, plus the
    exact thresholds (``find_threshold``) of the speed-ups in ``SWEEP_TARGETS``; rows in order
    of increasing speed-up."""
    config = run.model.config
    runner = EarlyExitRunner(run.model, run.params)
    batches = split_batches(run, split, batch_size)
    exit_logits = all_exit_logits(runner, batches, progress=progress)
    labels = np.concatenate([b["labels"] for b in batches])
    rows = []
    for criterion in criteria:
        if run.model.config.is_regression and not CRITERIA[criterion].regression:
            continue
        thresholds = set(sweep_thresholds(exit_logits, criterion))
        for target in SWEEP_TARGETS:
            try:
                thresholds.add(
                    find_threshold(exit_logits, criterion, target, config.num_hidden_layers, config.exits)
                )
            except ValueError:  # unreachable with this criterion
                pass
        looser_first = sorted(thresholds, reverse=CRITERIA[criterion].looser_when_higher)
        for threshold in reversed(looser_first):
            result = simulate(exit_logits, labels, criterion, threshold, task=run.task, config=config)
            rows.append(
                {
                    "run": run.name,
                    "criterion": criterion,
                    "threshold": threshold,
                    "metric": run.task.main_metric,
                }
                | result
            )
    return rows


def plot_sweep(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One panel per criterion, one curve per run: score against layer speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(criteria), figsize=(5 * len(criteria), 4), squeeze=False, sharey=True)
    for ax, criterion in zip(axes[0], criteria, strict=True):
        for name in runs:
            points = sorted(
                (r["speedup_layers"], r["score"])
                for r in rows
                if r["run"] == name and r["criterion"] == criterion
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(f"exit criterion: {criterion}")
        ax.set_xlabel("speed-up in layers (layers / mean layers run)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"dev {rows[0]['metric']}")
    axes[0][-1].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(report: EarlyExitReport, run: TrainedRun) -> str:
    """The human-readable report of ``eval.py --threshold``."""
    config = run.model.config
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())
    full = ", ".join(f"{k} {v:.4f}" for k, v in report.full_metrics.items())
    measured = (
        f"  speed-up measured:   {report.speedup_measured:.2f}x "
        f"(median over timed passes of their ratio; median times {report.seconds_full:.2f} s all layers, "
        f"{report.seconds_early:.2f} s early exit)"
        if report.speedup_measured is not None
        else "  speed-up measured:   not measured (--nomeasure)"
    )
    counts = "  ".join(
        f"layer {layer}: {count}" for layer, count in zip(config.exits, report.exit_counts, strict=True)
    )
    within = f" (within {regression_tolerance(config.dtype):.1g})" if config.num_labels == 1 else ""
    return "\n".join(
        [
            f"{run.workdir} (step {run.step}), {report.split}: {report.num_examples} examples",
            f"criterion {report.criterion}, threshold {report.threshold:.10g}",
            f"  early exit:  {metrics}",
            f"  all layers:  {full}",
            f"  mean layers run:     {report.mean_layers:.2f} of {config.num_hidden_layers}",
            f"  speed-up in layers:  {report.speedup_layers:.2f}x",
            measured,
            f"  examples leaving at each exit: {counts}",
            f"  predictions equal to the full model's at the exit taken{within}: {report.agreement:.2%}",
        ]
    )


def format_sweep(rows: list[dict[str, Any]], targets: tuple[float, ...] = (1.0, *SWEEP_TARGETS)) -> str:
    """A table of the sweep: for each run and criterion, the score at the tightest threshold of the
    grid whose layer speed-up reaches each target (as ``eval.py --speedup`` picks it)."""
    lines = [f"{'run':<28}{'criterion':<12}" + "".join(f"{f'@{s:g}x':>9}" for s in targets)]
    for name in dict.fromkeys(r["run"] for r in rows):
        for criterion in dict.fromkeys(r["criterion"] for r in rows if r["run"] == name):
            points = [r for r in rows if r["run"] == name and r["criterion"] == criterion]
            cells = []
            for target in targets:
                reached = [r for r in points if r["speedup_layers"] >= target * (1 - 1e-9)]
                tightest = min(reached, key=lambda r: r["speedup_layers"], default=None)
                cells.append(f"{tightest['score']:>9.4f}" if tightest else f"{'-':>9}")
            lines.append(f"{name[:27]:<28}{criterion:<12}" + "".join(cells))
    return "\n".join(lines)
