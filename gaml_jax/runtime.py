"""The serving runtime: input checks, tokenising, padding, and the loader of an exported program.

This module imports only numpy, jax, ``tokenizers`` and the standard library, never another
``gaml_jax`` module: ``python -m gaml_jax.export`` copies it into the artifact folder, where
``load(folder)`` runs the exported early-exit program without the training code. The
``EarlyExitClassifier`` (``gaml_jax.serving``) uses the same input checks and tokenising, so
both serve the same tokens that training saw.

    from gaml_jax.export import load        # or, with no gaml_jax: sys.path.insert(0, OUT); import runtime
    classify = load("exported/")
    classify(["a gripping, funny film", "dull"])  # [{"label": ..., "exit_layer": ...}, ...]
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import tokenizers
from jax import export

PROGRAM_FILE = "program.jax"  # jax.export serialization of the early-exit program
PARAMS_FILE = "params.npz"  # its parameter arguments, in order (p0000, p0001, ...)
META_FILE = "serving.json"  # criterion, default threshold, labels, buckets, ...
TOKENIZER_FILE = "tokenizer.json"

# An example is one text, or a pair of texts for a sentence-pair task.
Example = str | tuple[str, str]

# XLA:CPU options of the serving program, early exit as one program (``early_exit_program``: the
# runner's path at batch 1, and the exported program this loader runs): YNNPACK fusions off, so
# that matrix products run on XLA's own (Eigen) kernels. Measured side by side on a 2-core AVX2 CPU
# (bench/bench_cpu_options.py, MiniLM shape): the program at batch 1 x 32 tokens ran 1.16-1.19x
# faster. Elsewhere they do not pay: the forward at 32 x 64 ran 1.09x faster but the runner's
# batch programs (as eval.py compiles them) took 36% longer to compile, and the train steps ran
# 0.97-0.98x as fast; those keep XLA's defaults (training has its own: gaml_jax.compilation).
CPU_SERVING_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def cpu_compiler_options(options: dict[str, str]) -> dict[str, str] | None:
    """``options`` as ``jax.jit``'s ``compiler_options``, where they apply: on the CPU backend,
    with an XLA that knows them, and ``GAML_JAX_XLA_DEFAULTS`` unset (or 0); else None, which
    keeps XLA's defaults."""
    if os.environ.get("GAML_JAX_XLA_DEFAULTS", "0") not in ("", "0") or jax.default_backend() != "cpu":
        return None
    return dict(options) if _known(tuple(sorted(options.items()))) else None


@functools.cache
def _known(items: tuple[tuple[str, str], ...]) -> bool:
    try:  # an XLA without these options refuses them ("No such compile option")
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001  (JaxRuntimeError)
        return False
    return True


def serving_compiler_options() -> dict[str, str] | None:
    """``compiler_options`` of the serving program: ``cpu_compiler_options(CPU_SERVING_OPTIONS)``."""
    return cpu_compiler_options(CPU_SERVING_OPTIONS)


def serving_jit(fn, compiler_options: dict | None = None, **kwargs):
    """``jax.jit(fn, **kwargs)`` compiled with ``serving_compiler_options()`` and ``compiler_options``."""
    options = (serving_compiler_options() or {}) | (compiler_options or {})
    return jax.jit(fn, compiler_options=options or None, **kwargs)


# ----------------------------------------------------------------------------------------------
# Input checks.
# ----------------------------------------------------------------------------------------------


def check_examples(examples: Any, pair: bool | None) -> list[Example]:
    """Checks a list of texts (or of text pairs) and returns it as a list of str / (str, str).

    ``pair``: whether the task takes sentence pairs (``None``: unknown, either is accepted but
    not both in one call). Raises TypeError / ValueError naming the first bad example.
    """
    if isinstance(examples, str | bytes) or not isinstance(examples, Sequence):
        raise TypeError(
            f"give a list of texts (or of (text, text) pairs), got {type(examples).__name__}; "
            "for one text write predict([text])."
        )
    checked: list[Example] = []
    for i, example in enumerate(examples):
        if isinstance(example, str):
            texts = (example,)
        elif (
            isinstance(example, tuple | list)
            and len(example) == 2
            and all(isinstance(t, str) for t in example)
        ):
            texts = tuple(example)
        else:
            raise TypeError(
                f"texts[{i}] is {_describe(example)}: each example must be a str, or a (str, str) pair "
                "for a sentence-pair task."
            )
        for text in texts:
            if not text.strip():
                raise ValueError(f"texts[{i}] is an empty text: remove it, or give it words.")
        checked.append(texts[0] if len(texts) == 1 else texts)
    kinds = {isinstance(e, tuple) for e in checked}
    if pair is True and False in kinds:
        i = next(i for i, e in enumerate(checked) if not isinstance(e, tuple))
        raise ValueError(
            f"this model classifies sentence pairs, but texts[{i}] is a single text: "
            "give (text_a, text_b) pairs."
        )
    if pair is False and True in kinds:
        i = next(i for i, e in enumerate(checked) if isinstance(e, tuple))
        raise ValueError(f"this model classifies single texts, but texts[{i}] is a pair: give one text each.")
    if kinds == {True, False}:
        raise ValueError("mixed single texts and (text, text) pairs in one call: give one kind only.")
    return checked


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# ----------------------------------------------------------------------------------------------
# Tokenising and padding.
# ----------------------------------------------------------------------------------------------


class Tokenized(NamedTuple):
    input_ids: list[list[int]]  # per example, [CLS] ... [SEP] (... [SEP]), at most max_length
    token_type_ids: list[list[int]]
    truncated: np.ndarray  # [N] bool: the example had more than max_length tokens


class TextTokenizer:
    """Tokens as training made them (transformers' ``tokenizer(a, text_pair=b, truncation=True,
    max_length=...)``: special tokens, longest-first truncation), marking the truncated examples.

    Holds two configured copies of the tokenizer (building one parses its JSON: ~0.1 s for a
    BERT vocabulary, too slow per call).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_length: int):
        self.max_length = max_length
        self._whole = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._whole.no_padding()
        self._whole.no_truncation()
        self._cut = tokenizers.Tokenizer.from_str(self._whole.to_str())
        self._cut.enable_truncation(max_length, strategy="longest_first")

    def __call__(self, examples: list[Example]) -> Tokenized:
        if not examples:
            return Tokenized([], [], np.zeros(0, bool))
        encodings = self._whole.encode_batch(examples)
        input_ids = [e.ids for e in encodings]
        token_type_ids = [e.type_ids for e in encodings]
        truncated = np.fromiter((len(ids) > self.max_length for ids in input_ids), bool, len(input_ids))
        if truncated.any():
            long = np.flatnonzero(truncated)
            for i, e in zip(long, self._cut.encode_batch([examples[i] for i in long]), strict=True):
                input_ids[i], token_type_ids[i] = e.ids, e.type_ids
        return Tokenized(input_ids, token_type_ids, truncated)


def tokenize(tokenizer: tokenizers.Tokenizer, examples: list[Example], max_length: int) -> Tokenized:
    """``TextTokenizer(tokenizer, max_length)(examples)``: for one-off use."""
    return TextTokenizer(tokenizer, max_length)(examples)


# A lone example is padded to a multiple of this many tokens, not to a length bucket: at batch 1
# every padded token is work thrown away, and one program per length is all that compiles (the
# early-exit loop). On the rt dev sentences the buckets (32, 64, 128) ran 1.52 tokens per real
# token, multiples of 8 run 1.12: MiniLM's early exit at batch 1 took 4% less time on average in
# one run of bench/bench_serving.py, its median no less (the median sentence pads to 32 either way).
SINGLE_LENGTH_MULTIPLE = 8


def pad_length(
    longest: int, length_buckets: Sequence[int], max_length: int, *, multiple: int | None = None
) -> int:
    """The smallest length bucket that holds ``longest`` tokens, capped at ``max_length``; with
    ``multiple`` (a lone example's padding), the smallest multiple of it instead."""
    if multiple:
        return min(-(-longest // multiple) * multiple, max_length)
    for bucket in sorted(length_buckets):
        if bucket >= longest:
            return min(bucket, max_length)
    return max_length


def batch_bucket(n: int, batch_buckets: Sequence[int]) -> int:
    """The batch size ``n`` examples are padded to (``n`` itself beyond the largest bucket)."""
    return next((b for b in sorted(batch_buckets) if b >= n), n)


def pad_batch(
    tokens: Tokenized, rows: Sequence[int], seq_len: int, pad_id: int, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """``rows`` of ``tokens`` padded to [batch_size or len(rows), seq_len]; padding rows repeat the
    first row (they exit with it, so they cost no extra layer)."""
    rows = list(rows)
    rows += [rows[0]] * ((batch_size or len(rows)) - len(rows))
    input_ids = np.full((len(rows), seq_len), pad_id, np.int32)
    token_type_ids = np.zeros((len(rows), seq_len), np.int32)
    attention_mask = np.zeros((len(rows), seq_len), np.int32)
    for r, i in enumerate(rows):
        n = len(tokens.input_ids[i])
        input_ids[r, :n] = tokens.input_ids[i]
        token_type_ids[r, :n] = tokens.token_type_ids[i]
        attention_mask[r, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def length_batches(tokens: Tokenized, batch_size: int) -> list[np.ndarray]:
    """Example indices grouped into batches of similar length (shortest first): little padding."""
    lengths = np.fromiter(map(len, tokens.input_ids), np.int64, len(tokens.input_ids))
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------------------------
# Predictions.
# ----------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def prediction_record(
    logits: np.ndarray, exit_layer: int, label_names: Sequence[str], truncated: bool
) -> dict[str, Any]:
    """One example's answer as JSON: label (name, or value for regression), label_id,
    probabilities by label name, exit_layer (1-based encoder layer), truncated."""
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:  # regression
        return {
            "label": float(logits[0]),
            "label_id": None,
            "probabilities": None,
            "exit_layer": int(exit_layer),
            "truncated": bool(truncated),
        }
    probs = softmax(logits)
    label_id = int(np.argmax(logits))
    return {
        "label": label_names[label_id],
        "label_id": label_id,
        "probabilities": {name: float(p) for name, p in zip(label_names, probs, strict=True)},
        "exit_layer": int(exit_layer),
        "truncated": bool(truncated),
    }


# ----------------------------------------------------------------------------------------------
# The exported program.
# ----------------------------------------------------------------------------------------------


class ProgramOutput(NamedTuple):
    logits: np.ndarray  # [batch, labels] float32 logits of the exit each example took
    exit_layer: np.ndarray  # [batch] its 1-based encoder layer
    layers_run: int  # encoder layers the batch ran: the loop stops once every example has exited


class ExportedClassifier:
    """A folder written by ``python -m gaml_jax.export``: texts in, early-exit predictions out.

    One compiled program runs the encoder layers in a ``lax.while_loop`` that stops once every
    example of the batch has exited; batches are padded to the stored length and batch buckets
    (a lone example to a multiple of the stored ``single_length_multiple``),
    so each shape compiles once. Parameters go to the device once, here.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        missing = [
            n for n in (PROGRAM_FILE, PARAMS_FILE, META_FILE, TOKENIZER_FILE) if not (folder / n).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not an exported gaml-jax model (missing {', '.join(missing)}); write one with "
                "python -m gaml_jax.export WORKDIR OUT."
            )
        self.meta = json.loads((folder / META_FILE).read_text())
        self.exported = export.deserialize(bytearray((folder / PROGRAM_FILE).read_bytes()))
        with np.load(folder / PARAMS_FILE) as arrays:
            self.params = [jax.device_put(arrays[f"p{i:04d}"]) for i in range(len(arrays.files))]
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self._tokenize = TextTokenizer(self.tokenizer, self.meta["max_length"])
        self._program = serving_jit(self.exported.call)

    @property
    def label_names(self) -> list[str]:
        return self.meta["label_names"]

    @property
    def threshold(self) -> float:
        return self.meta["threshold"]

    def run(self, batch: dict[str, np.ndarray], threshold: float | None = None) -> ProgramOutput:
        """One padded batch through the program (``threshold`` default: the exported one)."""
        threshold = self.threshold if threshold is None else threshold
        logits, exit_layer, layers_run = self._program(
            self.params,
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            np.float32(threshold),
        )
        return ProgramOutput(np.asarray(logits), np.asarray(exit_layer), int(layers_run))

    def __call__(
        self, texts: Sequence[Example], *, threshold: float | None = None, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """Predictions for texts (or text pairs): one dict per example, in order (``prediction_record``)."""
        meta = self.meta
        threshold = self.threshold if threshold is None else threshold
        if meta["criterion"] == "patience":
            if threshold < 1 or threshold != int(threshold):
                raise ValueError(f"the patience threshold must be an integer >= 1, got {threshold!r}.")
        elif not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the {meta['criterion']} threshold must be in [0, 1], got {threshold!r}.")
        examples = check_examples(texts, meta["pair"])
        tokens = self._tokenize(examples)
        records: list[dict[str, Any] | None] = [None] * len(examples)
        for rows in length_batches(tokens, batch_size):
            longest = max(len(tokens.input_ids[i]) for i in rows)
            # Exports before format 2 pad a lone example to the length buckets too.
            multiple = meta.get("single_length_multiple") if len(rows) == 1 else None
            seq_len = pad_length(longest, meta["length_buckets"], meta["max_length"], multiple=multiple)
            size = batch_bucket(len(rows), meta["batch_buckets"])
            logits, exit_layer, _ = self.run(
                pad_batch(tokens, rows, seq_len, meta["pad_id"], size), threshold
            )
            for r, i in enumerate(rows):
                records[i] = prediction_record(
                    logits[r], exit_layer[r], self.label_names, tokens.truncated[i]
                )
        return records


def load(folder: str | Path) -> ExportedClassifier:
    """The callable of an exported folder: ``load(OUT)(texts) -> [prediction dict, ...]``."""
    return ExportedClassifier(folder)
