"""Wall clock of real early exit against all layers, next to the layer speed-up.

Random-init models at MiniLM (6 x 384) and BERT-base (12 x 768) shapes, classifiers redrawn so
that exits vary in confidence across examples (see ``make_params``); token inputs of length 64
(random word-piece ids, 24-64 real tokens then padding). The threshold is the one that
``find_threshold`` picks on the full model's logits for the target layer speed-up.

Each pass runs over all the examples, after a warm-up pass that compiles every shape the runner
meets. The all-layers pass is the faster of two: the fused full forward and the layer-by-layer
runner with exits that never fire (on the CPU the per-layer programs are often the faster).
All-layers and early-exit passes alternate in pairs; the clock speed-up is the median over pairs
of their ratio (the machine is shared and noisy), and "best-of" divides the fastest full pass by
the fastest early-exit pass.

    python -m bench.bench_early_exit --quick
    python -m bench.bench_early_exit --shapes=minilm,bert-base
    python -m bench.bench_early_exit --quick --torch     # + PyTorch's early exit, same weights
    python -m bench.bench_early_exit --shapes=bert-base --dtype bfloat16 --torch   # on a GPU
    python -m bench.bench_early_exit --torch-only        # PyTorch's alone (ours only sets the threshold)

``--one-program`` adds early exit as one device program at every batch size (``EarlyExitRunner.program``,
what the runner runs for one example): the batch runs layer after layer until its last example has
left, with the criterion on the device, so no logits come to the host between layers and no batch
is compacted; its clock pays for the deepest exit of each batch.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import time

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from gaml_jax.config import ModelConfig
from gaml_jax.criteria import (
    DEFAULT_REGRESSION_TOLERANCE,
    check_criterion,
    exit_counts,
    find_threshold,
    speedup_layers,
)
from gaml_jax.early_exit import EarlyExitRunner
from gaml_jax.model import MultiExitBert

SHAPES = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
TARGET_RATIO = {1: 0.85, 32: 0.75}  # clock speed-up / layer speed-up wanted at about 2x
CLS, SEP, FIRST_WORD = 101, 102, 1996  # bert-base-uncased vocabulary: [CLS], [SEP], first whole word


def make_inputs(num_examples: int, seq_len: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq_len * 3 // 8, seq_len + 1, num_examples)
    input_ids = rng.integers(FIRST_WORD, vocab_size, (num_examples, seq_len)).astype(np.int32)
    input_ids[:, 0] = CLS
    input_ids[np.arange(num_examples), lengths - 1] = SEP
    attention_mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    input_ids *= attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": np.zeros_like(input_ids),
    }


def make_params(model: MultiExitBert, data: dict[str, np.ndarray], seed: int) -> dict:
    """Random init, then each exit's classifier redrawn so that its confidence varies across examples.

    At init every exit says "uniform" (logits ~1e-2), and the random encoder maps all inputs to
    nearly the same [CLS] state, so every example would leave at the same exit. Each classifier is
    redrawn along a random direction, centred and scaled on the pooled states of ``data``: exit k's
    logit gap is ~N(0, s_k^2) over the examples, s_k growing with depth as after training.
    """
    cfg = model.config
    ids = jnp.asarray(data["input_ids"])
    params = jax.jit(model.init)(jax.random.key(seed), ids[:1])["params"]
    hidden_states = jax.jit(
        lambda p, ids, mask: model.apply({"params": p}, ids, mask, output_hidden_states=True).hidden_states
    )(params, ids, jnp.asarray(data["attention_mask"]))
    mask = jnp.asarray(data["attention_mask"])
    for k, layer in enumerate(cfg.exits):
        pooled = np.asarray(
            model.apply({"params": params}, k, hidden_states[layer], mask, method=MultiExitBert.pool)
        )
        rng = np.random.default_rng([seed, k])
        kernel = rng.standard_normal((cfg.hidden_size, cfg.num_labels))
        logits = pooled @ kernel
        scale = (1 + 3 * k / max(cfg.num_exits - 1, 1)) / (logits.std(axis=0).mean() + 1e-12)
        params[f"classifier_{k}"] = {
            "kernel": jnp.asarray(kernel * scale, jnp.float32),
            "bias": jnp.asarray(-logits.mean(axis=0) * scale, jnp.float32),
        }
    return params


def batches(data: dict[str, np.ndarray], batch_size: int):
    n = len(data["input_ids"])
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in data.items()}


def time_pass(fn, data, batch_size) -> float:
    start = time.perf_counter()
    for batch in batches(data, batch_size):
        fn(batch)
    return time.perf_counter() - start


class TorchEarlyExit:
    """The PyTorch reference of the same early exit (``--torch``), with the same weights.

    HF ``BertModel``'s layers run one by one (the multi-exit model of ``bench_vs_torch``); at each
    exit the logits come to the host, the same criterion decides, and finished rows leave the
    batch (``index_select``). Its all-layers pass is the model's own forward.
    """

    def __init__(self, cfg: ModelConfig, params: dict, dtype: str):
        import torch

        from bench.bench_vs_torch import TorchSide, torch_model

        self.torch, self.cfg, self.side = torch, cfg, TorchSide(dtype)
        self.model = torch_model(cfg).eval()
        state = {}
        for path, value in flax.traverse_util.flatten_dict(params).items():
            head, *mid, leaf = path
            prefix = f"exits.{head.split('_')[1]}" if head.startswith("classifier_") else f"bert.{head}"
            prefix = prefix.replace("bert.layer_", "bert.encoder.layer.")
            value = np.asarray(value).T if leaf == "kernel" else np.asarray(value)
            leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
            state[".".join([prefix, *mid, leaf])] = torch.from_numpy(np.array(value))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("_ids") for k in missing):  # buffers only may be missing
            raise RuntimeError(f"weight mapping: missing {missing}, unexpected {unexpected}")
        self.model.to(self.side.device)
        self._exit_of_layer = {layer - 1: k for k, layer in enumerate(cfg.exits)}

    def full(self, batch) -> np.ndarray:
        b = self.side.batch(batch)
        with self.torch.inference_mode(), self.side.autocast():
            logits = self.model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return logits.float().cpu().numpy()  # [exits, batch, labels]; the host sync

    def run(self, batch, criterion: str, threshold) -> np.ndarray:
        """Early exit; returns the layers run per example."""
        torch, cfg, bert = self.torch, self.cfg, self.model.bert
        crit, threshold = check_criterion(criterion, threshold, cfg.num_labels)
        b = self.side.batch(batch)
        n = b["input_ids"].shape[0]
        exit_index, running, state = np.zeros(n, np.int64), np.arange(n), None
        with torch.inference_mode(), self.side.autocast():
            hidden = bert.embeddings(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"])
            # Additive mask, representable in bfloat16 and float32 alike.
            mask = (1.0 - b["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.bfloat16).min
            for i, layer in enumerate(bert.encoder.layer):
                out = layer(hidden, attention_mask=mask.to(hidden.dtype))
                hidden = out[0] if isinstance(out, tuple) else out
                k = self._exit_of_layer.get(i)
                if k is None:
                    continue
                logits = self.model.exits[k](bert.pooler(hidden)).float().cpu().numpy()
                if k == cfg.num_exits - 1:
                    exits = np.ones(len(running), bool)
                else:
                    exits, state = crit.step(logits, threshold, state, tolerance=DEFAULT_REGRESSION_TOLERANCE)
                exit_index[running[exits]] = k
                if exits.all():
                    break
                stay = ~exits
                running = running[stay]
                state = jax.tree.map(lambda a, keep=stay: a[keep], state)
                keep = torch.from_numpy(np.flatnonzero(stay)).to(self.side.device)
                hidden, mask = hidden.index_select(0, keep), mask.index_select(0, keep)
        return np.asarray(cfg.exits)[exit_index]


def measure(label: str, cfg, data, args, full_passes: dict, early_run, num_examples: int) -> list[tuple]:
    """Alternating timed passes: all layers (the faster of ``full_passes``) against early exit."""
    results = []
    for batch_size in args.batch_sizes:
        layers_run = []
        early = lambda batch, out=layers_run: out.append(early_run(batch))
        for fn in (*full_passes.values(), early):  # warm-up: compiles every shape met
            time_pass(fn, data, batch_size)
        full_times, early_times, wins = [], [], collections.Counter()
        for _ in range(args.repeats):  # pairs of passes, so that a burst of load hits one pair
            passes = {name: time_pass(fn, data, batch_size) for name, fn in full_passes.items()}
            full_times.append(min(passes.values()))
            wins[min(passes, key=passes.get)] += 1
            layers_run.clear()
            early_times.append(time_pass(early, data, batch_size))
        layers_run = np.concatenate(layers_run)
        exit_index = np.searchsorted(cfg.exits, layers_run)
        layer_speedup = speedup_layers(layers_run, cfg.num_hidden_layers)
        clock_speedup = statistics.median(f / e for f, e in zip(full_times, early_times, strict=True))
        best_speedup = min(full_times) / min(early_times)
        ratio, best_ratio = clock_speedup / layer_speedup, best_speedup / layer_speedup
        full_ms, early_ms = (1e3 * statistics.median(t) / num_examples for t in (full_times, early_times))
        print(
            f"  {label} batch {batch_size:3d}: full {full_ms:7.2f} ms/ex, early exit {early_ms:7.2f} ms/ex | "
            f"layer {layer_speedup:.3f}x  clock {clock_speedup:.3f}x (best-of {best_speedup:.3f}x)  "
            f"clock/layer {ratio:.3f} (best-of {best_ratio:.3f})"
            f" | exits per exit {exit_counts(exit_index, cfg.num_exits).tolist()}"
            f" | faster all-layers pass: {dict(wins)}"
        )
        results.append((label, batch_size, layer_speedup, clock_speedup, ratio, best_ratio))
    return results


def bench_shape(name: str, args) -> list[tuple]:
    cfg = ModelConfig(**SHAPES[name], dtype=args.dtype)
    model = MultiExitBert(cfg)
    num_examples = args.examples or (32 if args.quick else {"minilm": 128, "bert-base": 48}[name])
    data = make_inputs(num_examples, args.seq_len, cfg.vocab_size, args.seed)
    params = make_params(model, data, args.seed)
    buckets = tuple(int(b) for b in args.batch_buckets.split(",")) if args.batch_buckets else None
    runner = EarlyExitRunner(model, params, **({"batch_buckets": buckets} if buckets else {}))

    exit_logits = np.concatenate([np.asarray(runner.full_forward(b)) for b in batches(data, 32)], axis=1)
    threshold = find_threshold(exit_logits, args.criterion, args.target, cfg.num_hidden_layers, cfg.exits)
    print(
        f"\n{name}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {num_examples} examples x "
        f"{args.seq_len} tokens, {args.dtype}, {args.criterion} threshold {threshold:.6g} "
        f"(simulated {args.target}x)"
    )
    # Two all-layers baselines; the faster of each pair counts: the fused forward (the deepest
    # exit's answer, on the host), and the layer-by-layer runner whose exits never fire.
    full_passes = {
        "fused": lambda batch: np.asarray(runner.full_forward(batch)[-1]),
        "layerwise": lambda batch: runner.run(batch, "patience", 10**9),
    }
    early = lambda batch: runner.run(batch, args.criterion, threshold).layers_run
    results = [] if args.torch_only else measure(name, cfg, data, args, full_passes, early, num_examples)
    if args.one_program:
        program = runner.program(args.criterion)

        def one_program(batch):
            ids, mask, types = (
                np.asarray(batch[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")
            )
            return np.asarray(program(ids, mask, types, np.float32(threshold))[1], np.int64)

        results += measure(f"{name}/program", cfg, data, args, full_passes, one_program, num_examples)
    if args.torch or args.torch_only:
        reference = TorchEarlyExit(cfg, params, args.dtype)
        torch_logits = np.concatenate([reference.full(b) for b in batches(data, 32)], axis=1)
        error = np.abs(torch_logits - exit_logits).max() / np.abs(exit_logits).max()
        same = (torch_logits.argmax(-1) == exit_logits.argmax(-1)).mean()
        print(f"  torch, same weights: max |logits - ours| / max |ours| {error:.1e}, same argmax {same:.1%}")
        full_passes = {
            "fused": lambda batch: reference.full(batch)[-1],
            "layerwise": lambda batch: reference.run(batch, "patience", 10**9),
        }
        early = lambda batch: reference.run(batch, args.criterion, threshold)
        results += measure(f"{name}/torch", cfg, data, args, full_passes, early, num_examples)
    return results


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="MiniLM only, 32 examples, 2 timed pairs.")
    parser.add_argument("--shapes", default=None, help=f"Comma-separated, from {sorted(SHAPES)}.")
    parser.add_argument("--examples", type=int, default=None, help="Examples per pass (default per shape).")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--batch-buckets", default=None, help="Runner buckets, e.g. 1,2,4,8,16,32.")
    parser.add_argument("--criterion", default="entropy")
    parser.add_argument("--target", type=float, default=2.0, help="Layer speed-up the threshold aims at.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed pairs of passes (default 5).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Compute dtype.")
    parser.add_argument("--torch", action="store_true", help="Also PyTorch's early exit, same weights.")
    parser.add_argument("--torch-only", action="store_true", help="PyTorch's early exit only (not ours).")
    parser.add_argument(
        "--one-program",
        action="store_true",
        help="Also early exit as one device program at every batch size.",
    )
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    shapes = args.shapes.split(",") if args.shapes else (["minilm"] if args.quick else list(SHAPES))
    args.repeats = args.repeats or (2 if args.quick else 5)

    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform}: {device.device_kind} x{jax.device_count()}; "
        f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS') or 'none'}"
    )
    results = [r for name in shapes for r in bench_shape(name, args)]
    print("\nshape            batch  layer x  clock x  clock/layer  best-of  target")
    for name, batch_size, layer, clock, ratio, best_ratio in results:
        target = TARGET_RATIO.get(batch_size, "-")
        row = f"{name:16s} {batch_size:6d}  {layer:7.3f}  {clock:7.3f}  {ratio:11.3f}  {best_ratio:7.3f}"
        print(f"{row}  >= {target}")


if __name__ == "__main__":
    main()
