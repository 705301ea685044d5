"""Use a trained model: ``EarlyExitClassifier`` (texts in, early-exit predictions out), prediction
files (``predict.py``) and labelled files scored by ``eval.py --data_file``.

    from gaml_jax import EarlyExitClassifier

    classifier = EarlyExitClassifier.from_workdir("workdirs/default", speedup=2)  # threshold found on dev
    for p in classifier.predict(["a gripping, funny film", "dull and overlong"]):
        print(p.label, p.probabilities, p.exit_layer)

The classifier runs real early exit (``EarlyExitRunner``): parameters go to the device once,
examples are grouped by length and padded to the run's length buckets, and the runner pads
batches to its batch buckets, so a finite set of shapes is ever compiled (``warmup()`` compiles
them all) and repeated calls never recompile.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from gaml_jax import data as data_lib
from gaml_jax import evaluation, runtime
from gaml_jax.checkpoints import RUN_CONFIG_FILE, TASK_FILE, TOKENIZER_DIR, load_trained
from gaml_jax.criteria import DEFAULT_REGRESSION_TOLERANCE, check_criterion, find_threshold
from gaml_jax.early_exit import DEFAULT_BATCH_BUCKETS, EarlyExitRunner
from gaml_jax.model import MultiExitBert
from gaml_jax.tasks import TaskInfo
from gaml_jax.weights import CONVERTED_MARKER, load_pretrained, load_tokenizer

logger = logging.getLogger(__name__)

PyTree = Any
# A converted folder carries no data config: these mirror configs/default.py.
CONVERTED_MAX_LENGTH = 128
CONVERTED_LENGTH_BUCKETS = (32, 64, 128)
# jax.monitoring's event for an XLA executable built (a persistent-cache hit included).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCount:
    """How many XLA executables were built while the ``count_compilations()`` block ran."""

    count: int = 0


@contextlib.contextmanager
def count_compilations() -> Iterator[CompileCount]:
    """Counts compilations in the block (jit cache misses; jax.monitoring's compile event)."""
    counter = CompileCount()

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if event == _COMPILE_EVENT:
            counter.count += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One example's early-exit answer."""

    label: str | float  # the class name, or the value (regression)
    label_id: int | None  # None for regression
    probabilities: dict[str, float] | None  # by class name; None for regression
    exit_layer: int  # encoder layers run (1-based layer of the exit taken)
    truncated: bool  # the input had more than max_length tokens and was cut

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Outputs(NamedTuple):
    """``EarlyExitClassifier.run`` on N examples, in input order."""

    logits: np.ndarray  # [N, labels] logits of the exit each example took
    exit_layers: np.ndarray  # [N] 1-based layer of that exit
    truncated: np.ndarray  # [N] bool
    batch_of: np.ndarray  # [N] index of the batch that computed the example
    batch_seconds: np.ndarray  # [batches] wall time of each batch (padded tokens -> host logits)
    # [batches] bool: the batch compiled a new shape (then it ran twice, the second run timed)
    batch_compiled: np.ndarray


class EarlyExitClassifier:
    """A trained multi-exit BERT that answers each text at the first exit its criterion accepts.

    Build it with ``from_workdir`` (a ``train.py`` run; the threshold given, or calibrated on the
    run's dev split for a target speed-up) or ``from_converted`` (a ``python -m gaml_jax.convert``
    folder; the threshold given). ``predict`` takes texts, or (text, text) pairs for a pair task.
    """

    def __init__(
        self,
        model: MultiExitBert,
        params: PyTree,
        tokenizer: Any,
        *,
        criterion: str = "entropy",
        threshold: float,
        label_names: Sequence[str] | None = None,
        pair: bool | None = None,
        text_columns: Sequence[str] | None = None,
        max_length: int | None = None,
        length_buckets: Sequence[int] = CONVERTED_LENGTH_BUCKETS,
        batch_size: int = 32,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
        single_length_multiple: int | None = runtime.SINGLE_LENGTH_MULTIPLE,
    ):
        """``tokenizer``: a transformers fast tokenizer; ``pair``: whether examples are sentence pairs
        (None: either); ``label_names``: by class id (default LABEL_i); ``text_columns``: the
        columns ``predict.py`` reads by default (default: the task's, else ``text``); ``max_length``:
        tokens per example, longer ones are cut (default 128, or the model's positions if fewer);
        ``single_length_multiple``: a batch of one example is padded to a multiple of this many
        tokens rather than to a length bucket (None: to the buckets, as every batch)."""
        config = model.config
        self.model, self.config, self.criterion = model, config, criterion
        self.threshold = threshold
        if config.num_labels > 1:
            label_names = tuple(label_names or (f"LABEL_{i}" for i in range(config.num_labels)))
            if len(label_names) != config.num_labels:
                raise ValueError(f"{len(label_names)} label names for a model of {config.num_labels} labels.")
        self.label_names = tuple(label_names or ())
        max_length = max_length or min(CONVERTED_MAX_LENGTH, config.max_position_embeddings)
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the model's {config.max_position_embeddings} positions."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.pair, self.max_length, self.tolerance = pair, int(max_length), tolerance
        self.length_buckets = tuple(sorted(int(b) for b in length_buckets))
        self.batch_size = int(batch_size)
        if single_length_multiple is not None and single_length_multiple < 1:
            raise ValueError(f"single_length_multiple must be >= 1 or None, got {single_length_multiple}.")
        self.single_length_multiple = single_length_multiple
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token.")
        self.tokenizer, self.pad_id = tokenizer.backend_tokenizer, int(tokenizer.pad_token_id)
        self._tokenize = runtime.TextTokenizer(self.tokenizer, max_length)
        self.text_columns = tuple(text_columns or (("sentence1", "sentence2") if pair else ("text",)))
        self.task: TaskInfo | None = None  # set by from_workdir
        self.step: int | None = None
        # The runner puts the parameters on the device, once.
        self.runner = EarlyExitRunner(model, params, batch_buckets=tuple(batch_buckets))

    @property
    def threshold(self) -> float | int:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | int) -> None:
        """Checked against the criterion and the model (a ValueError names the valid range)."""
        _, self._threshold = check_criterion(self.criterion, value, self.config.num_labels)

    # ------------------------------------------------------------------------------ construction

    @classmethod
    def from_workdir(
        cls,
        workdir: str | Path,
        *,
        criterion: str = "entropy",
        threshold: float | None = None,
        speedup: float | None = None,
        checkpoint: str = "best",
        batch_size: int = 32,
        length_buckets: Sequence[int] | None = None,
        progress: bool = False,
    ) -> EarlyExitClassifier:
        """The ``best`` (or ``latest``) checkpoint of a ``train.py`` run, with ``threshold`` or with
        the tightest threshold whose layer speed-up on the run's dev split reaches ``speedup``.
        ``length_buckets``: padded lengths (default the run's; finer ones pad less and compile
        more shapes). A converted folder is passed on to ``from_converted`` (which needs a threshold)."""
        workdir = Path(workdir)
        if (workdir / CONVERTED_MARKER).is_file():
            if threshold is None:
                raise ValueError(
                    f"{workdir} is a converted model with no dev split to calibrate on: give a threshold."
                )
            return cls.from_converted(
                workdir,
                criterion=criterion,
                threshold=threshold,
                batch_size=batch_size,
                length_buckets=length_buckets or CONVERTED_LENGTH_BUCKETS,
            )
        if (threshold is None) == (speedup is None):
            raise ValueError("give one of threshold=T or speedup=S.")
        if threshold is not None:  # before the (slow) loading
            check_criterion(criterion, threshold, num_labels=2)
        elif not speedup >= 1:
            raise ValueError(f"speedup must be >= 1, got {speedup}.")
        model, params, step = load_trained(workdir, checkpoint)
        root = workdir.absolute()
        task = read_task(root)
        data_config = json.loads((root / RUN_CONFIG_FILE).read_text())["data"]
        tokenizer = load_tokenizer(root / TOKENIZER_DIR)
        classifier = cls(
            model,
            params,
            tokenizer,
            criterion=criterion,
            threshold=1 if threshold is None else threshold,  # calibrated below
            label_names=task.label_names,
            pair=len(task.text_columns) == 2,
            text_columns=task.text_columns,
            max_length=data_config["max_length"],
            length_buckets=length_buckets or data_config["length_buckets"],
            batch_size=batch_size,
        )
        classifier.task, classifier.step = task, step
        if speedup is not None:
            classifier.threshold = calibrate_threshold(
                classifier.runner, data_config, tokenizer, criterion, speedup, progress=progress
            )
        return classifier

    @classmethod
    def from_converted(
        cls,
        folder: str | Path,
        *,
        criterion: str = "entropy",
        threshold: float,
        label_names: Sequence[str] | None = None,
        pair: bool | None = None,
        max_length: int | None = None,
        length_buckets: Sequence[int] = CONVERTED_LENGTH_BUCKETS,
        batch_size: int = 32,
    ) -> EarlyExitClassifier:
        """A ``python -m gaml_jax.convert`` folder (it must hold the tokenizer)."""
        model, params = load_pretrained(folder)
        return cls(
            model,
            params,
            load_tokenizer(folder),
            criterion=criterion,
            threshold=threshold,
            label_names=label_names,
            pair=pair,
            max_length=max_length,
            length_buckets=length_buckets,
            batch_size=batch_size,
        )

    # ------------------------------------------------------------------------------ inference

    def predict(
        self, examples: Sequence[runtime.Example], *, batch_size: int | None = None
    ) -> list[Prediction]:
        """Texts (or (text, text) pairs) -> one ``Prediction`` per example, in order.

        Raises TypeError / ValueError naming the first bad example (not a list, not text, an empty
        text, single texts for a pair task). Texts over ``max_length`` tokens are cut (``truncated``).
        """
        out = self.run(examples, batch_size=batch_size)
        return [
            Prediction(**runtime.prediction_record(z, layer, self.label_names, cut))
            for z, layer, cut in zip(out.logits, out.exit_layers, out.truncated, strict=True)
        ]

    def run(
        self, examples: Sequence[runtime.Example], *, batch_size: int | None = None, progress: bool = False
    ) -> Outputs:
        """``predict`` as arrays, with each batch's wall time (for latency figures)."""
        examples = runtime.check_examples(examples, self.pair)
        tokens = self._tokenize(examples)
        n, num_labels = len(examples), self.config.num_labels
        logits, exit_layers = np.zeros((n, num_labels), np.float32), np.zeros(n, np.int64)
        batch_of = np.zeros(n, np.int64)
        seconds, compiled = [], []
        batches = runtime.length_batches(tokens, batch_size or self.batch_size)
        for b, rows in enumerate(tqdm(batches, desc="predict", unit="batch", disable=not progress)):
            seq_len = self.pad_length(max(len(tokens.input_ids[i]) for i in rows), len(rows))
            batch = runtime.pad_batch(tokens, rows, seq_len, self.pad_id)
            with count_compilations() as compilations:
                result, batch_seconds = self._timed_run(batch)
            if compilations.count:  # that time was mostly compiling: time the (now compiled) batch again
                result, batch_seconds = self._timed_run(batch)
            seconds.append(batch_seconds)
            compiled.append(compilations.count > 0)
            logits[rows] = result.logits
            exit_layers[rows] = result.layers_run
            batch_of[rows] = b
        return Outputs(
            logits, exit_layers, tokens.truncated, batch_of, np.asarray(seconds), np.asarray(compiled, bool)
        )

    def pad_length(self, longest: int, batch_size: int) -> int:
        """The padded length of a batch of ``batch_size`` examples whose longest has ``longest``
        tokens: its length bucket, or for a lone example the next multiple of
        ``single_length_multiple``."""
        multiple = self.single_length_multiple if batch_size == 1 else None
        return runtime.pad_length(longest, self.length_buckets, self.max_length, multiple=multiple)

    def _timed_run(self, batch: dict[str, np.ndarray]):
        start = time.perf_counter()
        result = self.runner.run(batch, self.criterion, self.threshold, tolerance=self.tolerance)
        return result, time.perf_counter() - start  # the runner returns host arrays: synchronised

    def warmup(self, batch_size: int | None = None) -> int:
        """Compiles every shape that batches of up to ``batch_size`` examples can meet (each batch
        and length bucket, each compaction between batch buckets, and a lone example's program at
        each of its lengths); returns the compilations. After it no ``predict`` call compiles."""
        runner = self.runner
        sizes = sorted({runner.bucket(n) for n in range(1, (batch_size or self.batch_size) + 1)})
        # Lengths of batches ([CLS] and [SEP] at least), and of a lone example.
        lengths = sorted({self.pad_length(n, 2) for n in range(2, self.max_length + 1)})
        single_lengths = sorted({self.pad_length(n, 1) for n in range(2, self.max_length + 1)})
        never = ("patience", 10**9)  # runs every layer and exit of the batch
        hidden_size, dtype, device = (
            self.config.hidden_size,
            self.config.compute_dtype,
            jax.local_devices()[0],
        )
        with count_compilations() as compilations:
            for seq_len in lengths:
                for size in sizes:
                    ids = np.full((size, seq_len), self.pad_id, np.int32)
                    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                    runner.run(inputs, *never, one_program=False)  # every layer-by-layer function
                    # The runner gathers the running rows into each smaller bucket as examples exit
                    # (with numpy on the CPU: nothing to compile). (Committed to the device, as the
                    # runner's own arrays are: jit caches by placement.)
                    if runner.compacts_on_host:
                        continue
                    hidden = jax.device_put(np.zeros((size, seq_len, hidden_size), dtype), device)
                    mask = jax.device_put(np.ones((size, seq_len), np.int32), device)
                    for smaller in sizes[: sizes.index(size)]:
                        jax.block_until_ready(runner._compact(hidden, mask, np.zeros(smaller, np.int64)))
            for seq_len in single_lengths:  # a batch of one example
                ids = np.full((1, seq_len), self.pad_id, np.int32)
                inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
                if runner.one_program_at_batch_one and runner.bucket(1) == 1:  # its one program
                    runner.run(inputs, self.criterion, self.threshold, tolerance=self.tolerance)
                else:
                    runner.run(inputs, *never)
        return compilations.count


def read_task(workdir: str | Path) -> TaskInfo:
    """The task a ``train.py`` run was trained on (its ``task.json``)."""
    fields = json.loads((Path(workdir) / TASK_FILE).read_text())
    return TaskInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def calibrate_threshold(
    runner: EarlyExitRunner,
    data_config: dict[str, Any],
    tokenizer: Any,
    criterion: str,
    speedup: float,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> float | int:
    """The tightest threshold whose layer speed-up on the run's dev split reaches ``speedup``
    (``find_threshold`` on every exit's logits of the dev examples)."""
    task, splits = data_lib.load_task(data_config, tokenizer)
    dev = splits[task.eval_splits[0]]
    batches = data_lib.eval_batches(
        dev, batch_size, buckets=tuple(data_config["length_buckets"]), max_length=data_config["max_length"]
    )
    exit_logits = evaluation.all_exit_logits(runner, list(evaluation.real_rows(batches)), progress=progress)
    config = runner.config
    return find_threshold(exit_logits, criterion, speedup, config.num_hidden_layers, config.exits)


# ----------------------------------------------------------------------------------------------
# Files: predict.py's input and output, eval.py --data_file.
# ----------------------------------------------------------------------------------------------

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".txt": "text"}


class Table(NamedTuple):
    examples: list[runtime.Example]
    labels: list[Any] | None  # the label column's raw values, where one was asked for


def read_examples(
    path: str,
    *,
    text_columns: Sequence[str],
    label_column: str | None = None,
    pair: bool | None = None,
) -> Table:
    """Examples from a CSV/TSV/JSON(L) file (``text_columns``: one, or two for pairs), or from plain
    text lines (``.txt``, or ``-`` for stdin; a pair per line as ``text_a<TAB>text_b``).

    Raises FileNotFoundError or ValueError naming the file, the row and the fix: no such file, an
    unknown suffix, a missing column, a cell that is not text, an empty text, single texts for a
    pair task, a file without examples.
    """
    fmt = "text" if path == "-" else TABLE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path!r}: name it .csv, .tsv, .json, .jsonl or .txt.")
    if path != "-" and not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path!r}")
    if fmt == "text":
        if label_column is not None:
            raise ValueError(f"{path}: a plain-text file holds no labels; give a CSV/TSV/JSONL file.")
        return Table(_text_lines(path, pair), None)
    if pair is not None and len(text_columns) != (2 if pair else 1):
        kind = "sentence pairs: give two text columns" if pair else "single texts: give one text column"
        raise ValueError(f"this model classifies {kind} (got {list(text_columns)}).")
    examples, labels = [], []
    columns = [*text_columns, *([label_column] if label_column else [])]
    for row, record in _records(path, fmt):
        missing = [c for c in columns if c not in record]
        if missing:
            raise ValueError(
                f"{path} has no column {missing[0]!r} (row {row}); its columns: {sorted(record)}. "
                "Name the text column(s) with --text_columns (and the label with --label_column)."
            )
        texts = []
        for column in text_columns:
            text = record[column]
            if not isinstance(text, str):
                raise ValueError(f"{path} row {row}: column {column!r} holds {text!r}, not text.")
            if not text.strip():
                raise ValueError(
                    f"{path} row {row}: empty text in column {column!r}; remove the row or fill it."
                )
            texts.append(text)
        examples.append(texts[0] if len(texts) == 1 else tuple(texts))
        if label_column:
            labels.append(record[label_column])
    if not examples:
        raise ValueError(f"{path} holds no examples.")
    return Table(examples, labels if label_column else None)


def _text_lines(path: str, pair: bool | None) -> list[runtime.Example]:
    name = "stdin" if path == "-" else path
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():  # trailing blank lines end the file; others are errors
        lines.pop()
    examples: list[runtime.Example] = []
    for line_number, line in enumerate(lines, start=1):
        parts = line.split("\t")
        if pair and len(parts) != 2:
            raise ValueError(
                f"{name} line {line_number}: this model classifies sentence pairs: write each pair on one "
                "line as text_a<TAB>text_b, or give a CSV/TSV/JSONL file with two text columns."
            )
        texts = parts if pair else [line]
        if not all(t.strip() for t in texts):
            raise ValueError(f"{name} line {line_number}: empty text; remove the line or fill it.")
        examples.append(texts[0] if len(texts) == 1 else tuple(texts))
    if not examples:
        raise ValueError(f"{name} holds no examples.")
    return examples


def _records(path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number as the user sees it, record) of a CSV/TSV/JSON(L) file."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt in ("csv", "tsv"):
            # GLUE's TSVs hold unbalanced quotes: read TSV literally, as training does.
            tsv = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else {}
            reader = csv.DictReader(f, **tsv)
            for record in reader:
                yield reader.line_num, {k: v for k, v in record.items() if k is not None}
            return
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array
        for i, record in enumerate(json.loads(text), start=1):
            yield i, _json_record(record, path, i)
        return
    for i, line in enumerate(io.StringIO(text), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path} line {i} is not JSON ({e.msg}); write one object per line."
                ) from None
            yield i, _json_record(record, path, i)


def _json_record(record: Any, path: str, row: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise ValueError(f"{path} row {row} is {type(record).__name__}, not an object with named fields.")
    return record


def label_ids(values: Sequence[Any], task: TaskInfo, path: str) -> np.ndarray:
    """Label values -> int32 class ids (a class name, or an id 0..n-1), float32 for regression."""
    if task.is_regression:
        try:
            return np.asarray([float(v) for v in values], np.float32)
        except (TypeError, ValueError):
            bad = next(v for v in values if not _is_number(v))
            raise ValueError(f"{path}: label {bad!r} is not a number (the task is a regression).") from None
    names = {name: i for i, name in enumerate(task.label_names)}
    ids = np.empty(len(values), np.int32)
    for i, value in enumerate(values):
        text = str(value).strip()
        if text in names:
            ids[i] = names[text]
        elif text.lstrip("-").isdigit() and 0 <= int(text) < task.num_labels and not isinstance(value, bool):
            ids[i] = int(text)
        else:
            raise ValueError(
                f"{path}: label {value!r} (example {i + 1}) is not in the label set {list(task.label_names)} "
                f"or ids 0..{task.num_labels - 1}."
            )
    return ids


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclasses.dataclass
class PredictSummary:
    """What ``predict_file`` did: counts, layers and latency (``format()`` prints it)."""

    num_examples: int
    output: str
    criterion: str
    threshold: float
    mean_layers: float
    num_layers: int
    speedup_layers: float
    batch_size: int
    latency_p50: float  # seconds an example waits for its batch (padded tokens to answer), median
    latency_p95: float
    examples_per_second: float  # over the timed batches
    truncated: int
    max_length: int

    def format(self) -> str:
        return "\n".join(
            [
                f"{self.num_examples} predictions written to {self.output} "
                f"({self.criterion} threshold {self.threshold:.6g}).",
                f"  mean layers run:     {self.mean_layers:.2f} of {self.num_layers}",
                f"  speed-up in layers:  {self.speedup_layers:.2f}x",
                f"  latency per example at batch size {self.batch_size} (the time of its batch): "
                f"p50 {self.latency_p50 * 1e3:.1f} ms, p95 {self.latency_p95 * 1e3:.1f} ms; "
                f"{self.examples_per_second:.1f} examples/s",
                f"  truncated to {self.max_length} tokens: {self.truncated} of {self.num_examples}",
            ]
        )


def predict_files(
    workdir: str | Path,
    input_path: str,
    output_path: str,
    *,
    criterion: str = "entropy",
    threshold: float | None = None,
    speedup: float | None = None,
    text_columns: Sequence[str] | None = None,
    batch_size: int = 32,
    checkpoint: str = "best",
    progress: bool = True,
) -> PredictSummary:
    """``predict.py``: the input is read and checked before the (slow) model loading, then
    predicted by ``EarlyExitClassifier.from_workdir`` and written (``predict_table``)."""
    if (threshold is None) == (speedup is None):
        raise ValueError("give one of --threshold T or --speedup S.")
    if threshold is not None:
        check_criterion(criterion, threshold, num_labels=2)
    elif not speedup >= 1:
        raise ValueError(f"--speedup must be >= 1, got {speedup}.")
    default_columns, pair = model_inputs(workdir)
    table = read_examples(input_path, text_columns=text_columns or default_columns, pair=pair)
    classifier = EarlyExitClassifier.from_workdir(
        workdir,
        criterion=criterion,
        threshold=threshold,
        speedup=speedup,
        checkpoint=checkpoint,
        batch_size=batch_size,
        progress=progress,
    )
    return predict_table(classifier, table, output_path, progress=progress)


def model_inputs(workdir: str | Path) -> tuple[tuple[str, ...], bool | None]:
    """(default text columns, whether examples are pairs) of a workdir or a converted folder
    (``("text",)``, either), read without loading the model."""
    workdir = Path(workdir)
    if (workdir / CONVERTED_MARKER).is_file():
        return ("text",), None
    if not (workdir / TASK_FILE).is_file():
        raise FileNotFoundError(
            f"{workdir} holds no gaml-jax training run (no {TASK_FILE}): give the --workdir of a train.py "
            "run, or a python -m gaml_jax.convert folder."
        )
    task = read_task(workdir)
    return task.text_columns, len(task.text_columns) == 2


def predict_table(
    classifier: EarlyExitClassifier, table: Table, output_path: str, *, progress: bool = True
) -> PredictSummary:
    """Predicts ``table``'s examples and writes one JSON object per example, in input order, to
    ``output_path`` (``-``: stdout): label, label_id, probabilities, exit_layer, truncated."""
    out = classifier.run(table.examples, progress=progress)
    stream = sys.stdout if output_path == "-" else _open_for_writing(output_path)
    with contextlib.nullcontext(stream) if output_path == "-" else stream:
        for z, layer, cut in zip(out.logits, out.exit_layers, out.truncated, strict=True):
            record = runtime.prediction_record(z, layer, classifier.label_names, cut)
            stream.write(json.dumps(record) + "\n")
    latency = out.batch_seconds[out.batch_of]  # each example waits for its whole batch
    num_layers = classifier.config.num_hidden_layers
    return PredictSummary(
        num_examples=len(table.examples),
        output=output_path if output_path != "-" else "stdout",
        criterion=classifier.criterion,
        threshold=float(classifier.threshold),
        mean_layers=float(out.exit_layers.mean()),
        num_layers=num_layers,
        speedup_layers=num_layers / float(out.exit_layers.mean()),
        batch_size=classifier.batch_size,
        latency_p50=float(np.percentile(latency, 50)),
        latency_p95=float(np.percentile(latency, 95)),
        examples_per_second=len(table.examples) / float(out.batch_seconds.sum()),
        truncated=int(out.truncated.sum()),
        max_length=classifier.max_length,
    )


def _open_for_writing(path: str):
    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def file_batches(
    run: evaluation.TrainedRun,
    path: str,
    batch_size: int,
    *,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """A labelled file as ``eval.py`` batches for ``run`` (columns default to the run's task's),
    tokenised and padded as the run's own splits are. Warns how many texts were truncated."""
    task = run.task
    table = read_examples(
        path,
        text_columns=tuple(text_columns or task.text_columns),
        label_column=label_column or task.label_column,
        pair=len(task.text_columns) == 2,
    )
    labels = label_ids(table.labels, task, path)
    tokenizer = load_tokenizer(Path(run.workdir) / TOKENIZER_DIR)
    max_length = run.data_config["max_length"]
    tokens = runtime.tokenize(tokenizer.backend_tokenizer, table.examples, max_length)
    if tokens.truncated.any():
        logger.warning(
            "%s: %d of %d examples have more than %d tokens and were truncated.",
            path,
            tokens.truncated.sum(),
            len(labels),
            max_length,
        )
    lengths = np.fromiter(map(len, tokens.input_ids), np.int64, len(labels))
    split = data_lib.EncodedSplit(
        name=path,
        input_ids=np.fromiter((t for ids in tokens.input_ids for t in ids), np.int32, lengths.sum()),
        token_type_ids=np.fromiter(
            (t for ids in tokens.token_type_ids for t in ids), np.int32, lengths.sum()
        ),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        labels=labels,
        example_ids=np.arange(len(labels)),
        pad_id=int(tokenizer.pad_token_id),
    )
    batches = data_lib.eval_batches(
        split, batch_size, buckets=tuple(run.data_config["length_buckets"]), max_length=max_length
    )
    return list(evaluation.real_rows(batches))


def write_predictions(
    path: str,
    runner: EarlyExitRunner,
    batches: Sequence[dict[str, np.ndarray]],
    criterion: str,
    threshold: float,
    task: TaskInfo,
) -> None:
    """Early exit over ``batches``, one JSON object per example (``prediction_record`` plus the
    gold ``gold_label``), in order, to ``path``."""
    with _open_for_writing(path) as f:
        for batch in batches:
            result = runner.run(batch, criterion, threshold)
            for z, layer, gold in zip(result.logits, result.layers_run, batch["labels"], strict=True):
                record = runtime.prediction_record(z, layer, task.label_names, truncated=False)
                del record["truncated"]  # not known here: eval.py warns of truncation while reading
                record["gold_label"] = float(gold) if task.is_regression else task.label_names[int(gold)]
                f.write(json.dumps(record) + "\n")
