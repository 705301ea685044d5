"""The exported early-exit program against the layer-by-layer runner (EarlyExitRunner) on the
same padded batches: the same exit layer and prediction for every example, at batch 1 and in a
batch of mixed lengths (padding kept out of mean-pooling exits), and a loop that stops at the
deepest exit taken. The standalone loader
runs in a process that cannot import gaml_jax."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gaml_jax import EarlyExitClassifier, runtime
from gaml_jax import export as export_lib
from tests import tiny_run


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    return tiny_run.make_workdir(tmp_path_factory.mktemp("export") / "run", *tiny_assets)


@pytest.fixture(scope="module")
def texts(tiny_assets):
    return [row.split(",")[0] for row in tiny_assets[2].read_text().splitlines()[1:]]


def _tokens(classifier, texts):
    return runtime.tokenize(classifier.tokenizer, texts, classifier.max_length)


def _entropy_midpoint(classifier, batch):
    """A threshold halfway between two observed entropies of the batch's non-final exits."""
    logits = np.asarray(classifier.runner.full_forward(batch), np.float64)[:-1]
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    scores = np.unique(-(p * np.log(p)).sum(-1) / np.log(2))
    return float(scores[len(scores) // 2 - 1 : len(scores) // 2 + 1].mean())


@pytest.fixture(scope="module")
def mean_run(tiny_assets, tmp_path_factory):
    """The tiny run with mean-pooling exits (the masked mean of the real tokens)."""
    return tiny_run.make_workdir(
        tmp_path_factory.mktemp("export") / "mean", *tiny_assets, exit_pooling="mean"
    )


@pytest.mark.parametrize("criterion, pooling", [("entropy", "cls"), ("patience", "cls"), ("entropy", "mean")])
def test_exported_program_equals_the_runner(run, mean_run, texts, tmp_path, criterion, pooling):
    workdir = {"cls": run, "mean": mean_run}[pooling]
    classifier = EarlyExitClassifier.from_workdir(workdir, criterion=criterion, threshold=1)
    assert classifier.config.exit_pooling == pooling
    tokens = _tokens(classifier, texts)
    mixed = runtime.pad_batch(tokens, range(len(texts)), 16, classifier.pad_id)  # lengths 4..12, padded
    threshold = _entropy_midpoint(classifier, mixed) if criterion == "entropy" else 1
    classifier.threshold = threshold
    exported = export_lib.load(export_lib.export_classifier(classifier, tmp_path / f"{criterion}-{pooling}"))
    assert exported.threshold == threshold

    expected = classifier.runner.run(mixed, criterion, threshold)
    assert len(set(expected.layers_run)) > 1, "the threshold should split the examples between exits"
    got = exported.run(mixed)
    np.testing.assert_array_equal(got.exit_layer, expected.layers_run)
    np.testing.assert_allclose(got.logits, expected.logits, rtol=0, atol=tiny_run.LOGIT_ATOL)
    assert got.layers_run == expected.layers_run.max()  # the loop ran to the deepest exit taken

    # Batch 1, each example padded only to its own length (the sequence length is symbolic).
    for i in range(0, len(texts), 3):
        alone = runtime.pad_batch(tokens, [i], len(tokens.input_ids[i]), classifier.pad_id)
        expected = classifier.runner.run(alone, criterion, threshold)
        got = exported.run(alone)
        assert got.exit_layer[0] == expected.layers_run[0] == got.layers_run  # stopped at its exit
        assert got.logits[0].argmax() == expected.logits[0].argmax()
        np.testing.assert_allclose(got.logits, expected.logits, rtol=0, atol=tiny_run.LOGIT_ATOL)


def test_exported_callable_predicts_like_the_classifier(run, texts, tmp_path):
    classifier = EarlyExitClassifier.from_workdir(run, threshold=1.0, batch_size=4)
    classifier.threshold = _entropy_midpoint(
        classifier, runtime.pad_batch(_tokens(classifier, texts), range(40), 16, 0)
    )
    exported = export_lib.load(export_lib.export_classifier(classifier, tmp_path / "out"))
    long_text = " ".join(["w3"] * 30)
    examples = [*texts, long_text]
    records = exported(examples, batch_size=5)
    predictions = classifier.predict(examples)
    assert [r["exit_layer"] for r in records] == [p.exit_layer for p in predictions]
    assert [r["label"] for r in records] == [p.label for p in predictions]
    assert [r["truncated"] for r in records] == [False] * len(texts) + [True]
    for record, prediction in zip(records, predictions, strict=True):
        assert record["probabilities"] == pytest.approx(prediction.probabilities, abs=tiny_run.LOGIT_ATOL)
    # One example at a time: padded to a multiple of 8 tokens (the classifier's rule, stored).
    assert json.loads((tmp_path / "out" / runtime.META_FILE).read_text())["single_length_multiple"] == 8
    shapes, run_batch = [], exported.run
    exported.run = lambda batch, *a: shapes.append(batch["input_ids"].shape) or run_batch(batch, *a)
    alone = [r for e in examples[:6] for r in exported([e], batch_size=1)]
    lengths = [len(ids) for ids in _tokens(classifier, examples[:6]).input_ids]
    assert shapes == [(1, -(-n // 8) * 8) for n in lengths] and {s[1] for s in shapes} == {8, 16}
    assert [r["exit_layer"] for r in alone] == [p.exit_layer for p in predictions[:6]]
    assert [r["label"] for r in alone] == [p.label for p in predictions[:6]]
    # The threshold is an input: the loosest entropy threshold exits everything at layer 1.
    assert {r["exit_layer"] for r in exported(texts[:5], threshold=1.0)} == {1}
    with pytest.raises(ValueError, match=r"texts\[1\] is an empty text"):
        exported(["w1", ""])
    with pytest.raises(ValueError, match=r"the entropy threshold must be in \[0, 1\]"):
        exported(["w1"], threshold=2.0)


def test_loader_runs_without_the_training_code(run, texts, tmp_path):
    classifier = EarlyExitClassifier.from_workdir(run, criterion="patience", threshold=1)
    out = export_lib.export_classifier(classifier, tmp_path / "out")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(out)!r})\n"
        # gaml_jax is installed (editable) in the test venv: block it, as where it is absent.
        "class Absent:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'gaml_jax':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Absent())\n"
        "import runtime\n"
        f"records = runtime.load({str(out)!r})({texts[:8]!r})\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'gaml_jax', 'flax', 'optax', 'orbax', 'transformers', 'datasets', 'torch'})\n"
        "print(json.dumps({'records': records, 'loaded': loaded}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(  # keeps flatbuffers where it was put on the path, not the repo
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "gaml" not in p and p != "."
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["loaded"] == []
    expected = classifier.predict(texts[:8])
    assert [r["exit_layer"] for r in answer["records"]] == [p.exit_layer for p in expected]
    assert [r["label"] for r in answer["records"]] == [p.label for p in expected]


def test_export_command(run, tmp_path, capsys):
    out = tmp_path / "out"
    assert export_lib.main([str(run), str(out), "--criterion", "patience", "--threshold", "2"]) == 0
    meta = json.loads((out / runtime.META_FILE).read_text())
    assert meta["criterion"] == "patience" and meta["threshold"] == 2 and meta["label_names"] == ["0", "1"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [runtime.PROGRAM_FILE, runtime.PARAMS_FILE, runtime.META_FILE, runtime.TOKENIZER_FILE, "runtime.py"]
    )
    assert export_lib.main([str(run), str(out), "--threshold", "0.5"]) == 1
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert export_lib.main([str(tmp_path / "nothing"), str(tmp_path / "o2"), "--threshold", "0.5"]) == 1
    assert "holds no gaml-jax training run" in capsys.readouterr().err
