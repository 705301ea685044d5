"""The training recipe measured over seeds: CE, ML, GAML and named variants, each run scored at
all layers and with early exit at 1.5x, 2x and 3x fewer layers on a held-out test split.

    python bench/ablation.py              # ce, ml, gaml, gaml_uniform, gaml_2epochs x seeds 0,1,2
    python bench/ablation.py --variants ce_uniform,ml_uniform --seeds 0,1,2
    python bench/ablation.py --quick --out /tmp/ablation      # the tiny model, a minute (tests)
    make ablation

Every run trains the default config (configs/default.py: all-MiniLM-L6-v2 on Rotten Tomatoes)
with its variant's overrides, in-process (``gaml_jax.trainer.train_and_evaluate``), into
``OUT/runs/<variant>/seed<k>``. Its best checkpoint (by dev accuracy) then gives, in one full
forward, every exit's logits on dev and test. Early-exit thresholds are calibrated on dev
(``find_threshold``: the tightest reaching each speed-up in layers) and scored on test, which
neither training, checkpoint choice nor calibration sees. The run's scores go to
``scores.json`` beside it.

Resumable: a run with ``scores.json`` is skipped, a half-trained one resumes from its latest
checkpoint. Several invocations may work on one OUT at once (e.g. ``--seeds 2,1,0`` beside the
default order): a run being trained by a live process is locked (``OUT/runs/<variant>/seed<k>.lock``)
and the others pass it by. The report (``OUT/ablation.csv``, ``OUT/exits.csv``, ``OUT/ablation.md``,
``OUT/ablation.png``) covers every scored run under OUT, whichever invocation trained it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `configs`, `tests`

from configs import default  # noqa: E402
from gaml_jax.criteria import CRITERIA, exit_decisions, find_threshold, speedup_layers  # noqa: E402
from gaml_jax.early_exit import EarlyExitRunner  # noqa: E402
from gaml_jax.evaluation import all_exit_logits, load_run, split_batches  # noqa: E402
from gaml_jax.metrics import compute_metrics, predictions_from_logits  # noqa: E402
from gaml_jax.tasks import main_score  # noqa: E402
from gaml_jax.trainer import train_and_evaluate  # noqa: E402

# Variant name -> config overrides (dotted keys) on top of configs/default.py.
# ce, ml and gaml weight the exits' CE by layer number, as the paper's line of work does, for one
# epoch (configs/default.py until this ablation); gaml_uniform weights the exits equally, for one
# epoch; gaml_2epochs is the default recipe (uniform weights, two epochs), and the variants after
# it change one thing of it (ce_uniform and ml_uniform: the method, for the ordering under it).
ONE_EPOCH = {"train.num_epochs": 1}
LAYER = {"train.exit_weighting": "layer", **ONE_EPOCH}
VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"train.method": "ce", **LAYER},
    "ml": {"train.method": "ml", **LAYER},
    "gaml": {"train.method": "gaml", **LAYER},
    "gaml_uniform": {"train.method": "gaml", "train.exit_weighting": "uniform", **ONE_EPOCH},
    "gaml_2epochs": {"train.method": "gaml", "train.exit_weighting": "uniform", "train.num_epochs": 2},
    "ce_uniform": {"train.method": "ce", "train.exit_weighting": "uniform"},
    "ml_uniform": {"train.method": "ml", "train.exit_weighting": "uniform"},
    "gaml_cls": {"train.method": "gaml", "model.exit_pooling": "cls"},  # the old exits, on [CLS]
    "gaml_nodense": {"train.method": "gaml", "model.exit_pooler_dense": False},
    "gaml_per_tensor": {"train.method": "gaml", "train.per_tensor_alignment": True},
    "ml_cls": {"train.method": "ml", "model.exit_pooling": "cls"},
    "ce_cls": {"train.method": "ce", "model.exit_pooling": "cls"},
    "gaml_kd0.5": {"train.method": "gaml", "train.kd_weight": 0.5},
    "gaml_t2": {"train.method": "gaml", "train.temperature": 2.0},
    "gaml_exitlr1e-4": {"train.method": "gaml", "train.exit_learning_rate": 1e-4},
    # The default recipe under bfloat16 compute (float32 parameters): a CPU's choice where XLA
    # multiplies bfloat16 natively (AMX, AVX512_BF16), about 1.6x as fast there (model.NATIVE_BF16_PRODUCTS).
    "gaml_2epochs_bf16": {
        "train.method": "gaml",
        "train.exit_weighting": "uniform",
        "train.num_epochs": 2,
        "model.dtype": "bfloat16",
    },
}
CORE = ("ce", "ml", "gaml", "gaml_uniform", "gaml_2epochs")
TARGETS = (1.25, 1.5, 2.0, 2.5, 3.0)  # speed-ups in layers calibrated on dev (the table: 1.5, 2, 3)
TABLE_TARGETS = (1.5, 2.0, 3.0)
SCORES_FILE = "scores.json"
CSV_FIELDS = (
    "variant",
    "seed",
    "criterion",
    "target",
    "threshold",
    "dev_score",
    "dev_speedup",
    "test_score",
    "test_speedup",
)


def run_config(base: ml_collections.ConfigDict, variant: str, seed: int) -> ml_collections.ConfigDict:
    """``base`` with the variant's overrides and the seed (a copy; ``base`` is left alone)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; known: {', '.join(VARIANTS)}.")
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in VARIANTS[variant].items():
        section, field = key.split(".")
        config[section][field] = value
    config.train.seed = seed
    return config


def score_run(workdir: Path, *, batch_size: int) -> dict[str, Any]:
    """Dev and test logits of every exit (one full forward each), thresholds calibrated on dev
    and scored on test; every exit's own dev/test score."""
    run = load_run(str(workdir), "best")
    if "test" not in run.splits:
        raise ValueError(
            f"{workdir}: the task has no labelled test split; set data.test_fraction (rt) or data.test_file."
        )
    config, task = run.model.config, run.task
    runner = EarlyExitRunner(run.model, run.params)
    logits, labels = {}, {}
    for split in ("validation", "test"):
        batches = split_batches(run, split, batch_size)
        logits[split] = all_exit_logits(runner, batches, progress=False)  # [exits, N, labels]
        labels[split] = np.concatenate([b["labels"] for b in batches])
    layers = np.asarray(config.exits)

    def at(split: str, criterion: str, threshold) -> tuple[float, float]:
        exit_index = exit_decisions(logits[split], criterion, threshold)
        chosen = logits[split][exit_index, np.arange(len(exit_index))]
        metrics = compute_metrics(task.metrics, predictions_from_logits(chosen), labels[split])
        return main_score(task, metrics), speedup_layers(layers[exit_index], config.num_hidden_layers)

    def full(split: str) -> float:
        metrics = compute_metrics(task.metrics, predictions_from_logits(logits[split][-1]), labels[split])
        return main_score(task, metrics)

    rows = [
        {"criterion": "all", "target": 1.0, "threshold": math.nan}
        | {
            "dev_score": full("validation"),
            "dev_speedup": 1.0,
            "test_score": full("test"),
            "test_speedup": 1.0,
        }
    ]
    criteria = [c for c in ("entropy", "patience") if CRITERIA[c].regression or not config.is_regression]
    for criterion in criteria:
        for target in TARGETS:
            try:
                threshold = find_threshold(
                    logits["validation"], criterion, target, config.num_hidden_layers, config.exits
                )
            except ValueError:  # unreachable on dev with this criterion
                continue
            dev, test = at("validation", criterion, threshold), at("test", criterion, threshold)
            rows.append(
                {"criterion": criterion, "target": target, "threshold": float(threshold)}
                | {"dev_score": dev[0], "dev_speedup": dev[1], "test_score": test[0], "test_speedup": test[1]}
            )
    # The patience curve: every patience, wherever its speed-up falls (target NaN).
    if "patience" in criteria:
        for patience in range(1, config.num_exits):
            dev, test = at("validation", "patience", patience), at("test", "patience", patience)
            rows.append(
                {"criterion": "patience-curve", "target": math.nan, "threshold": float(patience)}
                | {"dev_score": dev[0], "dev_speedup": dev[1], "test_score": test[0], "test_speedup": test[1]}
            )
    exits = {
        split: [
            main_score(task, compute_metrics(task.metrics, predictions_from_logits(z), labels[split]))
            for z in logits[split]
        ]
        for split in ("validation", "test")
    }
    return {
        "step": run.step,
        "metric": task.main_metric,
        "num_dev": len(labels["validation"]),
        "num_test": len(labels["test"]),
        "rows": rows,
        "exits": exits,
    }


def _lock(path: Path) -> bool:
    """Takes the run's lock file, or says another live process holds it (a dead one's is taken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False  # held by a live process
            except (ProcessLookupError, ValueError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale: its process died
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def train_and_score(
    base: ml_collections.ConfigDict, variant: str, seed: int, out: Path
) -> dict[str, Any] | None:
    """One run, resumed or skipped as its workdir says; None where another process trains it."""
    workdir = out / "runs" / variant / f"seed{seed}"
    scores_file = workdir / SCORES_FILE
    if scores_file.is_file():
        print(f"[ablation] {variant} seed {seed}: done, skipped ({scores_file})", flush=True)
        return json.loads(scores_file.read_text())
    lock = workdir.with_name(f"{workdir.name}.lock")
    if not _lock(lock):
        print(f"[ablation] {variant} seed {seed}: another process is training it, passed by", flush=True)
        return None
    try:
        return _train_and_score(base, variant, seed, workdir)
    finally:
        lock.unlink(missing_ok=True)


def _train_and_score(
    base: ml_collections.ConfigDict, variant: str, seed: int, workdir: Path
) -> dict[str, Any]:
    scores_file = workdir / SCORES_FILE
    if scores_file.is_file():  # finished by another process between the check and the lock
        return json.loads(scores_file.read_text())
    config = run_config(base, variant, seed)
    start = time.perf_counter()
    print(f"[ablation] {variant} seed {seed}: training into {workdir}", flush=True)
    train_and_evaluate(config, str(workdir))
    trained = time.perf_counter()
    scores = score_run(workdir, batch_size=config.train.eval_batch_size)
    scores |= {
        "variant": variant,
        "seed": seed,
        "overrides": VARIANTS[variant],
        "train_seconds": trained - start,
        "score_seconds": time.perf_counter() - trained,
    }
    tmp = scores_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores, indent=1) + "\n")
    tmp.replace(scores_file)  # written whole or not at all: a kill while scoring rescores
    jax.clear_caches()  # each run compiles its own step; the persistent cache keeps them on disk
    print(
        f"[ablation] {variant} seed {seed}: {scores['train_seconds']:.0f} s training, "
        f"test {scores['metric']} all layers {scores['rows'][0]['test_score']:.4f}",
        flush=True,
    )
    return scores


# ----------------------------------------------------------------------------------------------
# The report.


def collect(out: Path) -> list[dict[str, Any]]:
    """Every scored run under ``out``, in the order of VARIANTS, then seed."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob(f"*/seed*/{SCORES_FILE}"))]
    order = {name: i for i, name in enumerate(VARIANTS)}
    return sorted(runs, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:  # one seed: no spread to show
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def _row(run: dict[str, Any], criterion: str, target: float) -> dict[str, Any] | None:
    return next((r for r in run["rows"] if r["criterion"] == criterion and r["target"] == target), None)


def write_report(out: Path) -> str:
    """CSVs, the markdown tables (returned), and the plot, from every scored run under ``out``."""
    runs = collect(out)
    if not runs:
        return "No scored runs yet."
    with open(out / "ablation.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for run in runs:
            for row in run["rows"]:
                writer.writerow({"variant": run["variant"], "seed": run["seed"]} | row)
    with open(out / "exits.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "split", "exit", "score"])
        for run in runs:
            for split, scores in run["exits"].items():
                for k, score in enumerate(scores):
                    writer.writerow([run["variant"], run["seed"], split, k + 1, score])

    metric = runs[0]["metric"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    by_variant = {v: [r for r in runs if r["variant"] == v] for v in variants}
    head = ["variant", "seeds", "all layers"] + [f"{t:g}x" for t in TABLE_TARGETS]
    head += [f"drop {t:g}x" for t in TABLE_TARGETS if t in (2.0, 3.0)] + ["exit 1 (dev)"]
    lines = [
        f"Test {metric} (mean ± sample std over seeds; a single value: one seed), entropy thresholds "
        "calibrated on dev; drop = all layers minus early exit, per seed.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for variant, group in by_variant.items():
        full = [_row(r, "all", 1.0)["test_score"] for r in group]
        cells = [variant, str(len(group)), _mean_std(full)]
        at = {}
        for target in TABLE_TARGETS:
            at[target] = [(_row(r, "entropy", target) or {}).get("test_score", math.nan) for r in group]
            cells.append(_mean_std(at[target]))
        for target in (2.0, 3.0):
            cells.append(_mean_std([f - e for f, e in zip(full, at[target], strict=True)]))
        cells.append(_mean_std([r["exits"]["validation"][0] for r in group]))
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", f"Every exit's dev {metric} (mean ± std over seeds):", ""]
    num_exits = len(runs[0]["exits"]["validation"])
    lines += ["| variant | " + " | ".join(f"exit {k + 1}" for k in range(num_exits)) + " |"]
    lines += ["|" + "---|" * (num_exits + 1)]
    for variant, group in by_variant.items():
        cells = [_mean_std([r["exits"]["validation"][k] for r in group]) for k in range(num_exits)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")

    lines += ["", f"Patience (PABEE): test speed-up in layers and test {metric} for each patience:", ""]
    lines += ["| variant | " + " | ".join(f"patience {p}" for p in range(1, num_exits)) + " |"]
    lines += ["|" + "---|" * num_exits]
    for variant, group in by_variant.items():
        cells = []
        for p in range(1, num_exits):
            points = [
                x
                for r in group
                for x in r["rows"]
                if x["criterion"] == "patience-curve" and x["threshold"] == p
            ]
            speed = np.mean([x["test_speedup"] for x in points])
            cells.append(f"{speed:.2f}x: {_mean_std([x['test_score'] for x in points])}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    plot(by_variant, metric, out / "ablation.png")
    return table


def plot(by_variant: dict[str, list[dict[str, Any]]], metric: str, path: Path) -> None:
    """Test score against speed-up in layers: entropy at the calibrated targets, and the patience
    curve; the line is the mean over seeds, the band ± one std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for variant, group in by_variant.items():
        for ax, criterion in zip(axes, ("entropy", "patience-curve"), strict=True):
            if criterion == "entropy":
                keys = [1.0, *TARGETS]
                pick = lambda r, key: _row(r, "all", 1.0) if key == 1.0 else _row(r, "entropy", key)
            else:
                keys = list(range(len(group[0]["exits"]["validation"]) - 1, 0, -1))
                pick = lambda r, key: next(
                    (x for x in r["rows"] if x["criterion"] == "patience-curve" and x["threshold"] == key),
                    None,
                )
            xs, means, stds = [], [], []
            for key in keys:
                points = [p for p in (pick(r, key) for r in group) if p is not None]
                if len(points) < len(group):  # a target some seed cannot reach
                    continue
                scores = [p["test_score"] for p in points]
                xs.append(np.mean([p["test_speedup"] for p in points]))
                means.append(np.mean(scores))
                stds.append(np.std(scores, ddof=1) if len(scores) > 1 else 0.0)
            xs, means, stds = map(np.asarray, (xs, means, stds))
            (line,) = ax.plot(xs, means, marker="o", markersize=3, label=f"{variant} ({len(group)} seeds)")
            ax.fill_between(xs, means - stds, means + stds, color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes, ("entropy (thresholds calibrated on dev)", "patience (PABEE)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("speed-up in layers on test (layers / mean layers run)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    axes[1].legend(loc="lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def quick_config(out: Path) -> ml_collections.ConfigDict:
    """The tiny model and task of tests/tiny.py, with a labelled test file: seconds per run."""
    from tests import tiny

    assets = out / "quick-assets"
    checkpoint = assets / "tiny-bert"
    if not checkpoint.is_dir():
        tiny.make_checkpoint(checkpoint)
    train_file, dev_file = tiny.make_task(assets / "task", seed=0)
    _, test_file = tiny.make_task(assets / "heldout", seed=1)
    config = tiny.train_config(checkpoint, train_file, dev_file)
    config.data.test_file = str(test_file)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default=",".join(CORE), help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--out", default="workdirs/ablation", help="runs, CSVs, tables and the plot")
    parser.add_argument("--quick", action="store_true", help="the tiny test model and task (seconds)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; rewrite the report")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    # Compiled steps and forwards kept on disk: later runs (and a resumed ablation) skip compiling.
    jax.config.update("jax_compilation_cache_dir", str(out / "jax-cache"))
    base = quick_config(out) if args.quick else default.get_config()
    base.train.checkpoint_every = min(base.train.checkpoint_every, 50)  # a kill loses little
    if not args.report_only:
        for seed in seeds:  # seed-major: a stopped ablation still compares the variants
            for variant in variants:
                train_and_score(base, variant, seed, out)
                write_report(out)
    print(write_report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
