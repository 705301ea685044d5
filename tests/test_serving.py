"""EarlyExitClassifier, predict.py and eval.py --data_file against the full model's logits of
every exit (one padded forward) and the criteria written out in numpy; inputs as training
tokenised them (the transformers tokenizer's own call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gaml_jax import EarlyExitClassifier, runtime, serving
from gaml_jax.weights import load_pretrained, load_tokenizer
from tests import tiny, tiny_run

MAX_LENGTH = 16  # tiny.train_config's data.max_length (one length bucket)


@pytest.fixture(scope="module")
def assets(tiny_assets, tmp_path_factory):
    checkpoint, train_file, dev_file = tiny_assets
    root = tmp_path_factory.mktemp("serving")
    pair_files = tiny_run.make_pair_task(root / "pairs")
    return {
        "checkpoint": checkpoint,
        "dev_file": dev_file,
        "pair_dev_file": pair_files[1],
        "run": tiny_run.make_workdir(root / "run", checkpoint, train_file, dev_file),
        "pair_run": tiny_run.make_workdir(root / "pair_run", checkpoint, *pair_files, pair=True),
    }


@pytest.fixture(scope="module")
def texts(assets):
    rows = (assets["dev_file"]).read_text().splitlines()[1:]
    return [row.split(",")[0] for row in rows]


# ------------------------------------------------------------------------------------ references


def hf_tokens(checkpoint, examples, max_length=MAX_LENGTH):
    """Tokens as training makes them: the transformers tokenizer's call."""
    tokenizer = load_tokenizer(checkpoint)
    firsts = [e if isinstance(e, str) else e[0] for e in examples]
    seconds = None if isinstance(examples[0], str) else [e[1] for e in examples]
    encoded = tokenizer(firsts, text_pair=seconds, truncation=True, max_length=max_length)
    return encoded["input_ids"], encoded["token_type_ids"]


def full_exit_logits(workdir, checkpoint, examples):
    """[exits, N, labels] from one full forward of the run's parameters on the padded examples."""
    classifier = EarlyExitClassifier.from_workdir(workdir, threshold=0.5)
    ids, types = hf_tokens(checkpoint, examples)
    batch = np.zeros((len(ids), MAX_LENGTH), np.int32)
    type_batch, mask = np.zeros_like(batch), np.zeros_like(batch)
    for i, (a, t) in enumerate(zip(ids, types, strict=True)):
        batch[i, : len(a)], type_batch[i, : len(a)], mask[i, : len(a)] = a, t, 1
    model, params = classifier.model, classifier.runner.params
    logits = model.apply({"params": params}, batch, attention_mask=mask, token_type_ids=type_batch).logits
    return np.asarray(logits, np.float64)


def numpy_exit(exit_logits, criterion, threshold):
    """[N] exit index taken, straight from the definitions (deepest exit always answers)."""
    num_exits, n, labels = exit_logits.shape
    z = exit_logits - exit_logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    if criterion == "entropy":
        fires = -(p * np.log(p)).sum(-1) / np.log(labels) < threshold
    elif criterion == "confidence":
        fires = p.max(-1) >= threshold
    else:
        argmax, fires = exit_logits.argmax(-1), np.zeros((num_exits, n), bool)
        for i in range(n):
            count = 0
            for k in range(1, num_exits):
                count = count + 1 if argmax[k, i] == argmax[k - 1, i] else 0
                fires[k, i] = count >= threshold
    fires[-1] = True
    return fires.argmax(0)


def midpoint_threshold(exit_logits, criterion, quantile):
    """A threshold halfway between two observed scores: no decision hinges on the last bits."""
    z = exit_logits[:-1] - exit_logits[:-1].max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    if criterion == "entropy":
        scores = -(p * np.log(p)).sum(-1) / np.log(p.shape[-1])
    else:
        scores = p.max(-1)
    scores = np.unique(scores)
    i = int(quantile * (len(scores) - 2))
    return float((scores[i] + scores[i + 1]) / 2)


# ----------------------------------------------------------------------------------- the classifier


@pytest.mark.parametrize(
    "criterion, quantile, batch_size",
    [("entropy", 0.5, 4), ("entropy", 0.3, 1), ("confidence", 0.6, 4), ("patience", 1, 4)],
)
def test_predictions_equal_the_full_model_at_the_exit_taken(assets, texts, criterion, quantile, batch_size):
    full = full_exit_logits(assets["run"], assets["checkpoint"], texts)
    threshold = quantile if criterion == "patience" else midpoint_threshold(full, criterion, quantile)
    classifier = EarlyExitClassifier.from_workdir(
        assets["run"], criterion=criterion, threshold=threshold, batch_size=batch_size
    )
    examples = texts if batch_size > 1 else texts[:6]
    predictions = classifier.predict(examples)
    exit_index = numpy_exit(full[:, : len(examples)], criterion, threshold)
    assert len(set(exit_index)) > 1, "the threshold should split the examples between exits"
    config = classifier.config
    for i, prediction in enumerate(predictions):
        logits = full[exit_index[i], i]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert prediction.exit_layer == config.exits[exit_index[i]]
        assert prediction.label_id == logits.argmax()
        assert prediction.label == classifier.label_names[logits.argmax()]
        np.testing.assert_allclose(
            list(prediction.probabilities.values()), probs, rtol=0, atol=tiny_run.LOGIT_ATOL
        )
        assert not prediction.truncated


def test_speedup_threshold_is_calibrated_on_the_dev_split(assets, texts):
    classifier = EarlyExitClassifier.from_workdir(assets["run"], speedup=1.5)
    full = full_exit_logits(assets["run"], assets["checkpoint"], texts)  # the dev split's examples
    exits = np.asarray(classifier.config.exits)
    speedup = lambda t: classifier.config.num_hidden_layers / exits[numpy_exit(full, "entropy", t)].mean()
    # The tightest threshold that reaches 1.5x: no observed entropy lies between it and the next
    # tighter candidate, which misses the target.
    assert speedup(classifier.threshold) >= 1.5
    z = full[:-1] - full[:-1].max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    scores = np.sort((-(p * np.log(p)).sum(-1) / np.log(2)).ravel())
    tighter = scores[scores < classifier.threshold]
    assert len(tighter) and speedup(tighter.max()) < 1.5  # at that score's own value it misses


def test_repeated_calls_never_recompile(assets, texts):
    classifier = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.9, batch_size=4)
    classifier.predict(texts[:9])
    with serving.count_compilations() as again:
        classifier.predict(texts[:9])
    assert again.count == 0
    assert classifier.warmup() > 0
    long_text = " ".join(["w3"] * 40)
    lone = [[t] for t in (texts[0], "w1", " ".join(["w2"] * 9), long_text)]  # padded to 8 and 16
    with serving.count_compilations() as after_warmup:
        for examples in (*lone, texts[3:6], texts[10:14], texts[:13], [long_text, *texts[20:22]]):
            for threshold in (0.0, 0.5, 0.9, 1.0):  # exits at every depth: every compaction path
                classifier.threshold = threshold
                classifier.predict(examples)
    assert after_warmup.count == 0


def test_a_lone_example_pads_to_a_multiple_of_eight_tokens(assets, texts, monkeypatch):
    """Batches pad to the run's length bucket (16); one example alone to the next multiple of 8
    tokens, with the same prediction as padded to the bucket."""
    assert runtime.pad_length(9, (16,), 16, multiple=8) == 16
    assert [runtime.pad_length(n, (32, 64), 40, multiple=8) for n in (2, 8, 9, 33, 40)] == [8, 8, 16, 40, 40]
    classifier = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.5, batch_size=4)
    assert classifier.single_length_multiple == 8
    shapes, run = [], classifier.runner.run
    monkeypatch.setattr(
        classifier.runner,
        "run",
        lambda batch, *a, **k: shapes.append(batch["input_ids"].shape) or run(batch, *a, **k),
    )
    examples = ["w1 w2", " ".join(["w3"] * 10), *texts[:3]]  # 4 and 12 tokens
    lengths = [len(ids) for ids in runtime.tokenize(classifier.tokenizer, examples, MAX_LENGTH).input_ids]
    assert lengths[:2] == [4, 12]

    def each_alone():  # (a batch that compiled runs a second time, for its latency: compile first)
        [classifier.predict([e], batch_size=1) for e in examples]
        shapes.clear()
        return [classifier.predict([e], batch_size=1)[0] for e in examples]

    alone = each_alone()
    assert shapes == [(1, -(-n // 8) * 8) for n in lengths]
    shapes.clear()
    batched = classifier.predict(examples[:2])
    assert shapes[-1] == (2, 16)
    classifier.single_length_multiple = None
    bucketed = each_alone()
    assert shapes == [(1, 16)] * len(examples)
    for a, b, c in zip(alone, bucketed, [*batched, *bucketed[2:]], strict=True):
        assert a.exit_layer == b.exit_layer == c.exit_layer and a.label_id == b.label_id == c.label_id
        assert a.probabilities == pytest.approx(b.probabilities, abs=tiny_run.LOGIT_ATOL)
    with pytest.raises(ValueError, match="single_length_multiple must be >= 1 or None, got 0"):
        EarlyExitClassifier(
            classifier.model,
            classifier.runner.params,
            load_tokenizer(assets["checkpoint"]),
            threshold=0.5,
            single_length_multiple=0,
        )


def test_counting_sees_a_compilation():
    """The counter the no-recompilation test relies on does count a new shape."""
    f = jax.jit(lambda x: x * 2)
    with serving.count_compilations() as counter:
        f(np.zeros(3, np.float32))
        f(np.zeros(3, np.float32))
        f(np.zeros(5, np.float32))
    assert counter.count == 2


def test_over_long_texts_are_truncated_like_training(assets, texts):
    long_texts = [" ".join(f"w{i % 20}" for i in range(30)), texts[0], " ".join(["w7"] * 25)]
    full = full_exit_logits(assets["run"], assets["checkpoint"], long_texts)  # on truncated tokens
    classifier = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.9)
    predictions = classifier.predict(long_texts)
    assert [p.truncated for p in predictions] == [True, False, True]
    exit_index = numpy_exit(full, "entropy", 0.9)
    for i, prediction in enumerate(predictions):
        assert prediction.label_id == full[exit_index[i], i].argmax()


def test_tokenize_equals_training_tokenisation(assets):
    examples = [
        " ".join(f"w{i % 20}" for i in range(25)),
        "w1 w2",
        (" ".join(["w5"] * 20), "w6 w7"),
        ("w1", " ".join(["w9"] * 30)),
    ]
    tokenizer = load_tokenizer(assets["checkpoint"])
    singles, pairs = examples[:2], examples[2:]
    for group in (singles, pairs):
        tokens = runtime.tokenize(tokenizer.backend_tokenizer, group, MAX_LENGTH)
        ids, types = hf_tokens(assets["checkpoint"], group)
        assert tokens.input_ids == ids and tokens.token_type_ids == types
    assert list(runtime.tokenize(tokenizer.backend_tokenizer, examples, MAX_LENGTH).truncated) == [
        True,
        False,
        True,
        True,
    ]


def test_sentence_pairs(assets):
    rows = [r.split(",") for r in assets["pair_dev_file"].read_text().splitlines()[1:]]
    pairs = [(a, b) for a, b, _ in rows]
    full = full_exit_logits(assets["pair_run"], assets["checkpoint"], pairs)
    threshold = midpoint_threshold(full, "entropy", 0.5)
    classifier = EarlyExitClassifier.from_workdir(assets["pair_run"], threshold=threshold, batch_size=8)
    exit_index = numpy_exit(full, "entropy", threshold)
    predictions = classifier.predict(pairs)
    assert [p.exit_layer for p in predictions] == [classifier.config.exits[k] for k in exit_index]
    assert [p.label_id for p in predictions] == [full[k, i].argmax() for i, k in enumerate(exit_index)]
    with pytest.raises(ValueError, match=r"classifies sentence pairs, but texts\[0\] is a single text"):
        classifier.predict(["w1 w2"])


@pytest.mark.parametrize(
    "examples, error, message",
    [
        ("w1 w2", TypeError, r"give a list of texts .* predict\(\[text\]\)"),
        (["w1", None], TypeError, r"texts\[1\] is NoneType None: each example must be a str"),
        (["w1", 3], TypeError, r"texts\[1\] is int 3"),
        (["w1", "  "], ValueError, r"texts\[1\] is an empty text"),
        ([("w1", "w2")], ValueError, r"classifies single texts, but texts\[0\] is a pair"),
    ],
)
def test_bad_input_gets_one_clear_error(assets, examples, error, message):
    classifier = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.5)
    with pytest.raises(error, match=message):
        classifier.predict(examples)


def test_a_threshold_outside_the_criterion_range_is_refused(assets):
    with pytest.raises(ValueError, match=r"'entropy' threshold must be a number in \[0, 1\], got 2"):
        EarlyExitClassifier.from_workdir(assets["run"], threshold=2)
    classifier = EarlyExitClassifier.from_workdir(assets["run"], criterion="patience", threshold=2)
    with pytest.raises(ValueError, match=r"'patience' threshold must be an integer >= 1, got 0.5"):
        classifier.threshold = 0.5


def test_from_converted_needs_a_threshold_and_predicts(assets, texts):
    checkpoint = assets["checkpoint"]
    with pytest.raises(ValueError, match="converted model with no dev split .* give a threshold"):
        EarlyExitClassifier.from_workdir(checkpoint, speedup=2)
    # Confidence >= 0 holds at the first exit: every example leaves at layer 1.
    classifier = EarlyExitClassifier.from_workdir(checkpoint, criterion="confidence", threshold=0.0)
    assert classifier.label_names == ("LABEL_0", "LABEL_1")
    model, params = load_pretrained(checkpoint)
    ids, types = hf_tokens(checkpoint, texts[:3])
    for prediction, a, t in zip(classifier.predict(texts[:3]), ids, types, strict=True):
        logits = np.asarray(
            model.apply({"params": params}, np.asarray([a]), token_type_ids=np.asarray([t])).logits
        )
        assert prediction.exit_layer == 1 and prediction.label_id == logits[0, 0].argmax()


def test_load_pretrained_returns_device_arrays(assets):
    _, params = load_pretrained(assets["checkpoint"])
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------- files


def test_predict_files_writes_one_record_per_input_in_order(assets, texts, tmp_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(texts[:11])]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(texts[:11]) + "\n\n")
    expected = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.9).predict(texts[:11])
    for source in (jsonl, txt, assets["dev_file"]):
        out = tmp_path / f"{source.name}.out.jsonl"
        summary = serving.predict_files(assets["run"], str(source), str(out), threshold=0.9, progress=False)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        n = len(records)
        assert n == (len(texts) if source == assets["dev_file"] else 11) == summary.num_examples
        for record, prediction in zip(records, expected, strict=False):
            assert record["label"] == prediction.label and record["exit_layer"] == prediction.exit_layer
            assert record["probabilities"] == pytest.approx(prediction.probabilities, abs=tiny_run.LOGIT_ATOL)
        layers = np.asarray([r["exit_layer"] for r in records])
        assert summary.mean_layers == pytest.approx(layers.mean())
        assert summary.speedup_layers == pytest.approx(4 / layers.mean())
        assert 0 < summary.latency_p50 <= summary.latency_p95


@pytest.mark.parametrize(
    "name, content, kwargs, error, message",
    [
        ("missing.csv", None, {}, FileNotFoundError, "no such file"),
        ("a.csv", "words,label\nw1,0\n", {}, ValueError, r"has no column 'text' .* --text_columns"),
        ("a.csv", "text,label\nw1,0\n,1\n", {}, ValueError, r"a.csv row 3: empty text in column 'text'"),
        (
            "a.jsonl",
            '{"text": "w1"}\n{"text": 5}\n',
            {},
            ValueError,
            r"row 2: column 'text' holds 5, not text",
        ),
        ("a.txt", "w1\n\nw2\n", {}, ValueError, r"a.txt line 2: empty text"),
        ("a.doc", "w1\n", {}, ValueError, r"cannot tell the format .* \.csv, \.tsv"),
        ("a.txt", "w1 w2\n", {"pair": True}, ValueError, r"line 1: this model classifies sentence pairs"),
        (
            "a.csv",
            "text\nw1\n",
            {"pair": True},
            ValueError,
            r"classifies sentence pairs: give two text columns",
        ),
    ],
)
def test_read_examples_errors(tmp_path, name, content, kwargs, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message):
        serving.read_examples(str(path), text_columns=("text",), **kwargs)


def test_predict_files_checks_the_input_before_loading(assets, tmp_path):
    single = tmp_path / "single.txt"
    single.write_text("w1 w2\n")
    with pytest.raises(ValueError, match="classifies sentence pairs"):
        serving.predict_files(assets["pair_run"], str(single), str(tmp_path / "o.jsonl"), threshold=0.5)
    with pytest.raises(FileNotFoundError, match="holds no gaml-jax training run"):
        serving.predict_files(tmp_path, str(single), str(tmp_path / "o.jsonl"), threshold=0.5)
    with pytest.raises(ValueError, match="give one of --threshold T or --speedup S"):
        serving.predict_files(assets["run"], str(single), str(tmp_path / "o.jsonl"))


def _script(name, *args, stdin=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(tiny.REPO_ROOT / name), *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        cwd=tiny.REPO_ROOT,
    )


def test_predict_py_reads_stdin_and_reports(assets, texts):
    result = _script(
        "predict.py", "--workdir", assets["run"], "--threshold", 0.9, "--input", "-", "--output", "-",
        stdin="\n".join(texts[:5]) + "\n",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    expected = EarlyExitClassifier.from_workdir(assets["run"], threshold=0.9).predict(texts[:5])
    assert [r["exit_layer"] for r in records] == [p.exit_layer for p in expected]
    assert [r["label"] for r in records] == [p.label for p in expected]
    for line in ("mean layers run:", "speed-up in layers:", "latency per example at batch size 32", "p95"):
        assert line in result.stderr
    missing = _script("predict.py", "--workdir", assets["run"], "--threshold", 0.9, "--input", "nope.csv",
                      "--output", "-")  # fmt: skip
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == "predict.py: error: no such file: 'nope.csv'"


def test_eval_py_scores_a_labelled_file(assets, texts, tmp_path):
    rows = [r.split(",") for r in assets["dev_file"].read_text().splitlines()[1:]]
    data = tmp_path / "scored.tsv"
    data.write_text("sentence\tgold\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    out = tmp_path / "preds.jsonl"
    result = _script("eval.py", "--workdir", assets["run"], "--threshold", 0.9, "--data_file", data,
                     "--text_columns", "sentence", "--label_column", "gold", "--nomeasure",
                     "--predictions", out, "--json", tmp_path / "report.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    full = full_exit_logits(assets["run"], assets["checkpoint"], texts)
    exit_index = numpy_exit(full, "entropy", 0.9)
    predicted = np.asarray([full[k, i].argmax() for i, k in enumerate(exit_index)])
    gold = np.asarray([int(y) for _, y in rows])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_examples"] == len(rows)
    assert report["score"] == pytest.approx((predicted == gold).mean())
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label_id"] for r in records] == predicted.tolist()
    assert [r["gold_label"] for r in records] == [str(y) for y in gold]
    assert [r["exit_layer"] for r in records] == [int(x) + 1 for x in exit_index]


def test_file_labels_are_names_or_ids(assets):
    task = serving.read_task(assets["run"])  # the tiny task's classes are named "0" and "1"
    np.testing.assert_array_equal(serving.label_ids(["1", 0, "0", 1], task, "f.csv"), [1, 0, 0, 1])
    with pytest.raises(ValueError, match=r"f.csv: label 'negative' \(example 2\) is not in the label set"):
        serving.label_ids(["1", "negative"], task, "f.csv")
