"""bench/ablation.py end to end on the tiny model (--quick): it trains, scores on the held-out
test split with thresholds from dev, reports, and a stopped ablation resumes where it stopped."""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest

from bench import ablation
from gaml_jax.evaluation import load_run
from gaml_jax.trainer import train_and_evaluate


@pytest.fixture
def keep_jax_cache_setting():
    """main() points JAX's compilation cache into its output folder: restore the setting."""
    before = jax.config.jax_compilation_cache_dir
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def _accuracy_of_deepest_exit(workdir, split):
    """Straight from the checkpoint: the deepest exit's argmax over the split, padding dropped."""
    run = load_run(str(workdir), "best")
    encoded, correct = run.splits[split], 0
    for i in range(encoded.num_examples):
        ids, types = encoded.tokens(i)
        logits = run.model.apply(
            {"params": run.params}, ids[None], np.ones_like(ids)[None], types[None]
        ).logits
        correct += int(np.argmax(logits[-1, 0]) == encoded.labels[i])
    return correct / encoded.num_examples


def test_quick_ablation_scores_reports_and_resumes(tmp_path, capsys, keep_jax_cache_setting):
    out = tmp_path / "ablation"
    assert ablation.main(["--quick", "--variants", "ce", "--seeds", "0", "--out", str(out)]) == 0
    scores = json.loads((out / "runs" / "ce" / "seed0" / ablation.SCORES_FILE).read_text())
    assert scores["num_test"] == 40 and scores["num_dev"] == 40
    all_layers = next(r for r in scores["rows"] if r["criterion"] == "all")
    assert all_layers["test_score"] == pytest.approx(
        _accuracy_of_deepest_exit(out / "runs" / "ce" / "seed0", "test"), abs=1e-9
    )
    entropy = [r for r in scores["rows"] if r["criterion"] == "entropy"]
    assert entropy and all(r["dev_speedup"] >= r["target"] - 1e-9 for r in entropy)  # calibrated on dev
    assert [r["threshold"] for r in scores["rows"] if r["criterion"] == "patience-curve"] == [1, 2, 3]

    # A second method stopped after step 2 (as a kill would): the ablation skips the finished
    # run and resumes the other from its checkpoint.
    config = ablation.run_config(ablation.quick_config(out), "ml", 0)
    train_and_evaluate(config, str(out / "runs" / "ml" / "seed0"), stop_after_step=2)
    capsys.readouterr()
    assert ablation.main(["--quick", "--variants", "ce,ml", "--seeds", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ce seed 0: done, skipped" in printed
    assert "Resuming" in printed and "at step 2 of 6" in printed
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["variant"], r["criterion"]) for r in rows} >= {("ce", "all"), ("ml", "all"), ("ml", "entropy")}
    table = (out / "ablation.md").read_text()
    assert "| ce | 1 |" in table and "| ml | 1 |" in table and (out / "ablation.png").stat().st_size > 0
    assert table.strip() in printed


def test_variants_are_config_overrides():
    base = ablation.default.get_config()
    config = ablation.run_config(base, "gaml_cls", 2)
    assert (config.train.method, config.model.exit_pooling, config.train.seed) == ("gaml", "cls", 2)
    assert base.model.exit_pooling == "auto" and base.train.seed == 0  # the base is left alone
    with pytest.raises(ValueError, match="Unknown variant"):
        ablation.run_config(base, "gaml_typo", 0)
