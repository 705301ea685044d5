"""eval.py and the early-exit evaluation of a trained run, against numpy references on the full
model's logits: scores, layer speed-ups, exit counts, thresholds, sweeps and errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from gaml_jax import evaluation, tasks
from gaml_jax.config import ModelConfig
from gaml_jax.early_exit import EarlyExitRunner
from gaml_jax.trainer import train_and_evaluate
from tests import tiny


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory):
    """Two trained tiny runs (GAML and CE-only), 24 steps each: exits that disagree."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("gaml", "ce"):
        config = tiny.train_config(*tiny_assets, num_train_steps=24, checkpoint_every=12, method=method)
        train_and_evaluate(config, str(root / method))
    return root


def _entropy(logits):
    """Numpy reference: prediction entropy / log(labels)."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / np.log(logits.shape[-1])


def _reference(run, threshold):
    """Exit taken, its accuracy and the layer speed-up, from one full forward (numpy)."""
    batches = evaluation.split_batches(run, "validation", 16)
    full = np.concatenate(
        [
            np.asarray(
                run.model.apply(
                    {"params": run.params},
                    b["input_ids"],
                    attention_mask=b["attention_mask"],
                    token_type_ids=b["token_type_ids"],
                ).logits
            )
            for b in batches
        ],
        axis=1,
    )  # [exits, N, labels]
    labels = np.concatenate([b["labels"] for b in batches])
    below = _entropy(full) < threshold  # [exits, N]
    below[-1] = True  # the deepest exit always answers
    exit_index = below.argmax(0)
    chosen = full[exit_index, np.arange(full.shape[1])]
    layers = np.asarray(run.model.config.exits)[exit_index]
    return {
        "exit_index": exit_index,
        "accuracy": float((chosen.argmax(-1) == labels).mean()),
        "deepest_accuracy": float((full[-1].argmax(-1) == labels).mean()),
        "speedup": run.model.config.num_hidden_layers / layers.mean(),
    }


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.6, 0.9, 1.0])
def test_early_exit_report_matches_the_numpy_reference(runs, threshold):
    run = evaluation.load_run(runs / "gaml")
    runner = EarlyExitRunner(run.model, run.params)
    batches = evaluation.split_batches(run, "validation", 16)
    report = evaluation.run_early_exit(
        runner,
        batches,
        "entropy",
        threshold,
        task=run.task,
        split="validation",
        measure=False,
        progress=False,
    )
    ref = _reference(run, threshold)
    assert report.score == pytest.approx(ref["accuracy"], abs=1e-12)
    assert report.speedup_layers == pytest.approx(ref["speedup"], rel=1e-12)
    assert report.exit_counts == np.bincount(ref["exit_index"], minlength=run.model.config.num_exits).tolist()
    assert report.full_metrics["accuracy"] == pytest.approx(ref["deepest_accuracy"], abs=1e-12)
    assert report.agreement == 1.0
    if threshold == 0.0:  # never exits early: all layers, the deepest exit's score
        assert report.speedup_layers == 1.0 and report.score == ref["deepest_accuracy"]


def test_speedup_grows_as_the_threshold_loosens(runs):
    run = evaluation.load_run(runs / "gaml")
    rows = evaluation.sweep_run(
        run, "validation", criteria=["entropy", "confidence", "patience"], batch_size=16
    )
    for criterion in ("entropy", "confidence", "patience"):
        # sweep_thresholds orders them from tightest to loosest.
        speedups = [r["speedup_layers"] for r in rows if r["criterion"] == criterion]
        assert speedups[0] == pytest.approx(1.0) or criterion == "patience"
        assert len(speedups) >= 3 and np.all(np.diff(speedups) >= -1e-12), (criterion, speedups)
        assert speedups[-1] > speedups[0]


def _eval(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "eval.py", *map(str, args)],
        cwd=tiny.REPO_ROOT,
        env={**os.environ},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_eval_py_speedup_reaches_the_target_and_writes_the_json(runs, tmp_path):
    out = tmp_path / "report.json"
    result = _eval("--workdir", runs / "gaml", "--speedup", 1.5, "--batch_size", 16, "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in (
        "metric",
        "score",
        "threshold",
        "criterion",
        "mean_layers",
        "speedup_layers",
        "speedup_measured",
        "exit_counts",
    ):
        assert key in report
    assert report["speedup_layers"] >= 1.5
    assert report["criterion"] == "entropy" and report["metric"] == "accuracy"
    assert report["speedup_measured"] > 0
    run = evaluation.load_run(runs / "gaml")
    ref = _reference(run, report["threshold"])
    assert report["score"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert "speed-up in layers" in result.stdout


def test_eval_py_sweep_draws_one_curve_per_run(runs, tmp_path):
    result = _eval("--workdir", runs / "gaml", "--workdir", runs / "ce", "--sweep", "--out", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run"] for r in rows} == {"gaml (gaml)", "ce (ce)"}
    assert {r["criterion"] for r in rows} == {"entropy", "confidence", "patience"}
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", 1.5], "threshold must be a number in [0, 1]"),
        (["--threshold", 0.5, "--criterion", "margin"], "Unknown exit criterion 'margin'"),
        (["--threshold", 2.5, "--criterion", "patience"], "threshold must be an integer >= 1"),
        (["--threshold", 0.5, "--split", "test"], "Split 'test' does not exist"),
        (["--speedup", 0.5], "--speedup must be >= 1"),
        (["--speedup", 50], "unreachable"),
        ([], "Give one of --threshold T or --speedup S"),
    ],
)
def test_eval_py_bad_input_names_the_fix(runs, args, message):
    result = _eval("--workdir", runs / "gaml", "--measure=false", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


def test_eval_py_without_a_checkpoint_says_to_train(tmp_path):
    result = _eval("--workdir", tmp_path, "--threshold", 0.5)
    assert result.returncode != 0
    assert "Train one first: python train.py --workdir" in result.stderr


class _ReplayRunner:
    """Stands in for EarlyExitRunner: answers every example at a given exit with given logits."""

    def __init__(self, config, exit_index, logits):
        self.config, self.exit_index, self.logits = config, exit_index, logits

    def run(self, batch, criterion, threshold):
        rows = batch["rows"]
        layers = np.asarray(self.config.exits)[self.exit_index[rows]]
        return SimpleNamespace(exit_index=self.exit_index[rows], layers_run=layers, logits=self.logits[rows])


@pytest.mark.parametrize("num_labels", [1, 3], ids=["regression", "classification"])
def test_agreement_allows_rounding_in_regression_and_counts_a_real_difference(num_labels):
    """Early-exit logits that are the full model's at the exit taken up to float32 rounding (the
    runner and the fused forward are different programs) agree; one changed example does not."""
    rng = np.random.default_rng(0)
    config = ModelConfig(**{**tiny.TINY, "num_labels": num_labels})
    n = 40
    full = rng.normal(2.5, 1.5, (config.num_exits, n, num_labels)).astype(np.float32)  # [exits, N, labels]
    exit_index = rng.integers(0, config.num_exits, n)
    early = full[exit_index, np.arange(n)]
    early = (early * (1 + 4e-7 * rng.standard_normal(early.shape))).astype(np.float32)  # rounding
    assert num_labels > 1 or not np.array_equal(early, full[exit_index, np.arange(n)])
    early[7] = early[7] + 0.5 if num_labels == 1 else np.roll(early[7], 1) * (1 + np.arange(num_labels))
    assert num_labels == 1 or early[7].argmax() != full[exit_index[7], 7].argmax()
    task = tasks.GLUE_TASKS["stsb"] if num_labels == 1 else tasks.GLUE_TASKS["mnli"]
    labels = rng.normal(2.5, 1.5, n) if num_labels == 1 else rng.integers(0, 3, n)
    batches = [{"rows": rows, "labels": labels[rows]} for rows in np.array_split(np.arange(n), 3)]
    report = evaluation.run_early_exit(
        _ReplayRunner(config, exit_index, early),
        batches,
        "patience",
        2,
        task=task,
        split="validation",
        exit_logits=full,
        measure=False,
        progress=False,
    )
    assert report.agreement == (n - 1) / n
