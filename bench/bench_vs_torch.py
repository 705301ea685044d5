"""Our JAX train step and forward against HF PyTorch on the same shapes, measured side by side.

The PyTorch reference (test-only; torch is not a dependency of the library) is the PABEE-style
multi-exit CE step: HF ``BertModel`` with the same config, one linear exit on the pooler of every
layer's [CLS] state (dropout before it), the layer-weighted CE of all exits, gradient clipping
at 1.0, AdamW with one rate for the encoder and another for the exits. Ours are the same CE step
(an optimizer made with ``method="ce"``) and the GAML step (``method="gaml"``). Also the inference forward
(every exit's logits, parameters on the device) at batch 1 x 32 and 32 x 64 tokens.

Timed calls alternate between the contenders, each round in the reverse order of the one before
(the machine is shared and noisy; ``race_order``); each figure is a median, and each ratio is ours
over PyTorch's examples/s (> 1: we are faster). torch uses as many threads as XLA's CPU client
does (one per core this process may run on).

    python bench/bench_vs_torch.py                    # MiniLM shape, batch 32 x seq 64
    python bench/bench_vs_torch.py --shape bert-base  # BERT-base shape
    python bench/bench_vs_torch.py --quick            # batch 8 x seq 32, 3 repeats
    python bench/bench_vs_torch.py --cores 1          # both on one core (steadier on a busy machine)
    python bench/bench_vs_torch.py --shape bert-base --seq 128 --dtype bfloat16   # on a GPU: + MFU
    python bench/bench_vs_torch.py --variants rbg,tree   # + what-if forms of our CE step, same run
    python bench/bench_vs_torch.py --dtype bfloat16 --torch-dtype float32   # ours in bf16, PyTorch's float32

On a GPU both sides run there: ours under bfloat16 compute with float32 parameters
(``--dtype bfloat16``), PyTorch under ``torch.autocast(bfloat16)`` with float32 parameters and
fused AdamW. Model FLOPs utilisation counts the matrix products of the model (3 passes for a CE
step, 5 for GAML's forward and two backwards) against the chip's dense bf16 peak.

``--variants`` adds what-if forms of our step (``VARIANTS``; ``xla:NAME=VALUE`` compiles the step
with that XLA option added), each raced beside the default in the same alternating calls, so a
change can be measured on a lent GPU before it is made: forms of the CE step, and of the GAML
step for those that only it has (``vmap``) or with ``--gaml-variants``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gaml_jax import model as model_lib  # noqa: E402
from gaml_jax.compilation import CompiledAhead, compile_ahead, training_compiler_options  # noqa: E402
from gaml_jax.config import ModelConfig  # noqa: E402
from gaml_jax.host_memory import keep_host_memory  # noqa: E402
from gaml_jax.losses import exit_weights  # noqa: E402
from gaml_jax.model import MultiExitBert  # noqa: E402
from gaml_jax.train_step import create_train_state, dropout_key, make_optimizer, train_step  # noqa: E402

SHAPES = {
    "minilm": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
    "bert-medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
LR, EXIT_LR, WEIGHT_DECAY, CLIP = 2e-5, 2e-4, 0.01, 1.0


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random word pieces, a random length per row (at least half the row), padding after it."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(seq // 2, 1), seq + 1, batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(1000, vocab, (batch, seq)) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, seq), np.int32),
        "labels": rng.integers(0, 2, batch).astype(np.int32),
        "weights": np.ones(batch, np.float32),
    }


# --------------------------------------------------------------------------- model FLOPs

# Dense bfloat16 peak of the chip in FLOP/s (datasheet, no sparsity), by a name in device_kind.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def forward_flops(config: ModelConfig, batch: int, seq: int, cls_only_last: bool = False) -> float:
    """Multiply-adds x 2 of one forward: projections, feed-forward, attention products, exits.
    ``cls_only_last``: the last layer as ours computes it for [CLS]-pooled exits (keys and values
    of every row; the query, attention output and feed-forward of one row)."""
    h, i = config.hidden_size, config.intermediate_size

    def layer(queries: int) -> int:
        keys_values = 2 * seq * 2 * h * h
        return keys_values + 2 * queries * (2 * h * h + 2 * h * i) + 2 * 2 * queries * seq * h

    layers = (config.num_hidden_layers - 1) * layer(seq) + layer(1 if cls_only_last else seq)
    exits = config.num_exits * 2 * (h * h + h * config.num_labels)
    return batch * (layers + exits)


def peak_flops() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    return kind, next((peak for name, peak in PEAK_BF16.items() if name in kind), None)


# --------------------------------------------------------------------------- ours


def bench_optimizer(method: str, **options):
    """Our optimizer as PyTorch's side has it: AdamW, the exits' own learning rate, clipping."""
    return make_optimizer(
        method=method,
        total_steps=10_000,
        learning_rate=LR,
        exit_learning_rate=EXIT_LR,
        warmup_steps=10,
        weight_decay=WEIGHT_DECAY,
        grad_clip_norm=CLIP,
        **options,
    )


# What-if forms of our step (--variants): name -> (what changes, keyword arguments of jax_step).
VARIANTS = {
    "rbg": ("dropout bits from XLA's RngBitGenerator (key impl 'rbg')", {"rng_impl": "rbg"}),
    "unsafe_rbg": ("dropout bits from RngBitGenerator, keys split unsafely", {"rng_impl": "unsafe_rbg"}),
    "tree": ("the optimizer per tensor, not on flat vectors", {"optimizer": {"flat": False}}),
    "all-flat": (
        "the optimizer's large tensors concatenated too (own_group_size=None), not each on its own",
        {"optimizer": {"own_group_size": None}},
    ),
    "vmap": ("GAML's two pull-backs batched (grad_mode='vmap')", {"grad_mode": "vmap"}),
    "eigen-dw": (
        "kernel gradients as XLA forms them, contracting the tokens (model.TRANSPOSED_WEIGHT_GRADIENTS off)",
        {"transposed_weight_gradients": False},
    ),
    "eigen-narrow-dw": (
        "narrowing kernels' gradients as XLA forms them (model.TRANSPOSED_NARROWING_WEIGHT_GRADIENTS off)",
        {"transposed_narrowing_weight_gradients": False},
    ),
    "strided-narrow-dw": (
        "narrowing kernels' gradients left column-major, read strided by the optimizer "
        "(model.ROW_MAJOR_NARROWING_GRADIENTS off)",
        {"row_major_narrowing_gradients": False},
    ),
    "upcast-bf16": (
        "bfloat16 products as XLA forms them, inputs converted to float32 (model.NATIVE_BF16_PRODUCTS off)",
        {"native_bf16_products": False},
    ),
    "eye-transposes": (
        "bfloat16 kernel gradients' transpositions as identity products (model.TRANSPOSES_BY_COPY off)",
        {"transposes_by_copy": False},
    ),
    "all-rows-last": (
        "the last exit's layer for every row, not [CLS] only (model.CLS_ONLY_LAST_LAYER off)",
        {"cls_only_last_layer": False},
    ),
    "f32-stream": (
        "the residual stream in float32 (model.float32_residual)",
        {"model_options": {"float32_residual": True}},
    ),
}
# The race's contenders every figure is measured against: a what-if form may leave the race, these may not.
BASELINES = ("ours CE", "ours GAML", "torch CE")
GAML_ONLY = {"vmap"}  # variants that change only what the GAML step computes (CE has one pull-back)


def variant_options(name: str) -> dict:
    """jax_step's keyword arguments for a variant: a name of ``VARIANTS``, or ``xla:NAME=VALUE``."""
    if name.startswith("xla:"):
        option, sep, value = name[4:].partition("=")
        if not sep:
            raise SystemExit(f"--variants: {name!r} needs a value: xla:NAME=VALUE")
        # JAX takes an option's value as a bool, an int or a string (an enum's name, a list).
        parsed = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
        return {"compiler_options": {option: parsed}}
    if name not in VARIANTS:
        raise SystemExit(
            f"--variants: unknown variant {name!r}; choose from {sorted(VARIANTS)} or xla:NAME=VALUE"
        )
    return VARIANTS[name][1]


def jax_step(
    config: ModelConfig,
    params,
    method: str,
    batch,
    *,
    rng_impl: str | None = None,
    optimizer: dict | None = None,
    compiler_options: dict | None = None,
    grad_mode: str = "vjp",
    model_options: dict | None = None,
    transposed_weight_gradients: bool | None = None,
    transposed_narrowing_weight_gradients: bool | None = None,
    row_major_narrowing_gradients: bool | None = None,
    native_bf16_products: bool | None = None,
    cls_only_last_layer: bool | None = None,
    transposes_by_copy: bool | None = None,
) -> Callable[[], None]:
    """``run()`` does one compiled update on ``batch`` (on the device), waits for it and returns its
    metrics. By default the trainer's step; the keyword arguments make its what-if forms
    (``VARIANTS``)."""
    model = MultiExitBert(config.replace(**(model_options or {})))
    tx = bench_optimizer(method, **(optimizer or {}))
    state = create_train_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
    switches = {
        "TRANSPOSED_WEIGHT_GRADIENTS": transposed_weight_gradients,
        "TRANSPOSED_NARROWING_WEIGHT_GRADIENTS": transposed_narrowing_weight_gradients,
        "ROW_MAJOR_NARROWING_GRADIENTS": row_major_narrowing_gradients,
        "NATIVE_BF16_PRODUCTS": native_bf16_products,
        "CLS_ONLY_LAST_LAYER": cls_only_last_layer,
        "TRANSPOSES_BY_COPY": transposes_by_copy,
    }

    def step_fn(state, batch, rng):
        # The model reads these switches while the step is traced: the variant's, wherever and
        # whenever that happens (compile_contenders traces the steps one after the other).
        with contextlib.ExitStack() as stack:
            for name, value in switches.items():
                stack.enter_context(_switched(model_lib, name, value))
            return train_step(state, batch, rng, model=model, tx=tx, grad_mode=grad_mode)

    step = CompiledAhead(  # with the trainer's XLA options
        jax.jit(
            step_fn,
            donate_argnums=0,
            compiler_options={**(training_compiler_options() or {}), **(compiler_options or {})} or None,
        ),
        key=lambda *args: "step",
    )
    # The trainer's dropout stream, unless a variant draws its bits otherwise.
    rng = dropout_key(0) if rng_impl is None else jax.random.key(0, impl=rng_impl)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch, rng)
        return jax.block_until_ready(metrics)

    run.ahead = (step, (state, batch, rng))  # what compile_contenders compiles
    return run


def compile_contenders(contenders: dict[str, Callable[[], None]], may_fail: Collection[str] = ()) -> None:
    """Compiles our steps among ``contenders`` before the race, several at once
    (``compilation.compile_ahead``: traced one after the other, compiled on a pool of threads, one
    per core this process may run on), and prints how long that took. On a GPU host, where each
    BERT-base step compiled for 30-45 s one after the other, and the host has many cores, that
    was most of a lent machine's minutes. A contender named in ``may_fail`` that does not compile
    (a variant with an XLA option the backend lacks, say) leaves ``contenders`` with one line
    saying why, so that one loan's race is not lost to one refused option; any other's error is
    raised."""
    ahead = {name: run.ahead for name, run in contenders.items() if hasattr(run, "ahead")}
    if not ahead:
        return
    names = {id(fn): name for name, (fn, _) in ahead.items()}
    failed = []

    def leave(fn, error: Exception) -> None:
        if names[id(fn)] not in may_fail:
            raise error
        failed.append(names[id(fn)])
        _leave_race(contenders, names[id(fn)], "it does not compile here", error)

    workers = min(len(ahead), max(2, usable_cores()))
    start = time.perf_counter()
    compile_ahead(list(ahead.values()), workers=workers, on_error=leave)
    print(
        f"  compiled our {len(ahead) - len(failed)} steps in {time.perf_counter() - start:.1f} s, "
        f"{workers} at a time",
        flush=True,
    )


def _leave_race(contenders: dict, name: str, why: str, error: Exception) -> None:
    """Takes ``name`` out of ``contenders``, with one line saying why."""
    del contenders[name]
    print(f"  {name} left the race: {why}: {str(error).splitlines()[0]}", flush=True)


@contextlib.contextmanager
def _switched(module, name: str, value):
    """Within it, ``module.name`` is ``value`` (unchanged where ``value`` is None)."""
    original = getattr(module, name)
    setattr(module, name, original if value is None else value)
    try:
        yield
    finally:
        setattr(module, name, original)


def jax_forward(config: ModelConfig, params, batch) -> Callable[[], None]:
    model = MultiExitBert(config)
    apply = jax.jit(lambda p, ids, mask, types: model.apply({"params": p}, ids, mask, types).logits)
    args = (params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return lambda: apply(*args).block_until_ready()


# --------------------------------------------------------------------------- PyTorch reference


def torch_model(config: ModelConfig):
    import torch
    import transformers

    class MultiExitTorch(torch.nn.Module):
        """HF BertModel + a linear exit on the (shared) pooler of every layer, as PABEE's code."""

        def __init__(self):
            super().__init__()
            hf = transformers.BertConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads,
                intermediate_size=config.intermediate_size,
                hidden_dropout_prob=config.hidden_dropout_prob,
                attention_probs_dropout_prob=config.attention_probs_dropout_prob,
            )
            self.bert = transformers.BertModel(hf)
            self.dropout = torch.nn.Dropout(config.exit_dropout)
            self.exits = torch.nn.ModuleList(
                torch.nn.Linear(config.hidden_size, config.num_labels) for _ in config.exits
            )

        def forward(self, input_ids, attention_mask, token_type_ids):  # -> [exits, batch, labels]
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            )
            pooled = [self.bert.pooler(out.hidden_states[layer]) for layer in config.exits]
            return torch.stack([exit(self.dropout(p)) for exit, p in zip(self.exits, pooled, strict=True)])

    return MultiExitTorch()


class TorchSide:
    """Where and how the PyTorch reference runs: the GPU when there is one, autocast for bf16."""

    def __init__(self, dtype: str):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype

    def batch(self, batch: dict[str, np.ndarray]) -> dict:
        t = self.torch
        return {
            k: t.from_numpy(v).to(self.device, t.float32 if v.dtype == np.float32 else t.long)
            for k, v in batch.items()
        }

    def autocast(self):
        return self.torch.autocast(self.device.type, self.torch.bfloat16, enabled=self.dtype == "bfloat16")

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def torch_step(config: ModelConfig, side: TorchSide, batch: dict[str, np.ndarray]) -> Callable[[], None]:
    torch = side.torch
    model = torch_model(config).to(side.device).train()
    decay = lambda name: not (name.endswith("bias") or "LayerNorm" in name)
    groups = []
    for is_exit, lr in ((False, LR), (True, EXIT_LR)):
        named = [(n, p) for n, p in model.named_parameters() if n.startswith("exits.") == is_exit]
        groups.append({"params": [p for n, p in named if decay(n)], "lr": lr, "weight_decay": WEIGHT_DECAY})
        groups.append({"params": [p for n, p in named if not decay(n)], "lr": lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, fused=side.device.type == "cuda")
    exit_w = torch.from_numpy(exit_weights(config.exits, "layer")).to(side.device)
    b = side.batch(batch)

    def run():
        with side.autocast():
            logits = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).float()
        per_exit = torch.stack([torch.nn.functional.cross_entropy(z, b["labels"]) for z in logits])
        loss = (exit_w * per_exit).sum() / exit_w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        side.sync()

    return run


def torch_forward(config: ModelConfig, side: TorchSide, batch: dict[str, np.ndarray]) -> Callable[[], None]:
    torch = side.torch
    model = torch_model(config).to(side.device).eval()
    b = side.batch(batch)

    def run():
        with torch.inference_mode(), side.autocast():
            model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        side.sync()

    return run


# --------------------------------------------------------------------------- timing


def keep_to_cores(cores: int | None) -> None:
    """Runs this process on its first ``cores`` cores only (all where None). Call it before JAX
    starts its CPU client, which sizes its thread pool on the affinity."""
    if cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def usable_cores() -> int:
    """How many cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads_as_xla(torch) -> int:
    """Gives torch as many threads as XLA's CPU client runs (one per core this process may use),
    and returns that number."""
    threads = usable_cores()
    torch.set_num_threads(threads)
    return threads


def add_race_arguments(
    parser: argparse.ArgumentParser, repeats: int, timed: str = "Timed calls of each"
) -> None:
    """The arguments of a race of ours against PyTorch's on a model shape: --shape, --quick,
    --batch, --seq, --repeats (``repeats`` by default; ``timed`` says what is repeated), --dtype,
    --cores. :func:`race_sizes` fills in the sizes left out."""
    parser.add_argument("--shape", default="minilm", choices=sorted(SHAPES))
    parser.add_argument("--quick", action="store_true", help="Batch 8 x seq 32, 3 repeats.")
    parser.add_argument("--batch", type=int, default=None, help="Batch (default 32; 8 with --quick).")
    parser.add_argument("--seq", type=int, default=None, help="Sequence length (default 64; 32 quick).")
    parser.add_argument("--repeats", type=int, default=None, help=f"{timed} (default {repeats}; 3 quick).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Compute dtype.")
    parser.add_argument("--cores", type=int, default=None, help="Run on this many cores only (both sides).")
    parser.set_defaults(default_repeats=repeats)


def race_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of :func:`add_race_arguments` with --batch, --seq and --repeats filled in where
    left out (smaller under --quick)."""
    args.batch = args.batch or (8 if args.quick else 32)
    args.seq = args.seq or (32 if args.quick else 64)
    args.repeats = args.repeats or (3 if args.quick else args.default_repeats)
    return args


def race_order(names: list[str], repeats: int) -> list[list[str]]:
    """The timed rounds of :func:`race`: every contender once per round, each round in the reverse
    order of the one before (A B C, C B A, A B C, ...). A contender then follows a different one
    from round to round, so whatever a call leaves behind for the next (the cause was not measured)
    is not always charged to the same neighbour: in a fixed order, our GAML step always ran right
    after PyTorch's step and its ratio to our CE step read 1.90-2.03 on BERT-base, against 1.65-1.80
    raced without PyTorch, and 1.94 on MiniLM against 1.71 counterbalanced (docs/performance.md)."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(repeats)]


def race(
    contenders: dict[str, Callable[[], None]], repeats: int, may_fail: Collection[str] = ()
) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per call of each contender, after a first (warm-up) call each;
    the timed calls alternate between the contenders, in the rounds of :func:`race_order`.

    CPU seconds (all threads of this process) are the steadier figure on a shared CPU: they do
    not grow when other processes take the cores, as wall time does. A contender named in
    ``may_fail`` whose first call raises (a what-if form out of the device's memory, say) leaves
    ``contenders`` with one line saying why; any other's error is raised.
    """
    for name, run in list(contenders.items()):
        wall = time.perf_counter()
        try:
            run()
        except Exception as error:
            if name not in may_fail:
                raise
            _leave_race(contenders, name, "its first call failed", error)
            continue
        print(
            f"  first call of {name}: {time.perf_counter() - wall:.1f} s (compiling, or warming up)",
            flush=True,
        )
    times = {name: {"wall": [], "cpu": []} for name in contenders}
    for round_names in race_order(list(contenders), repeats):
        for name in round_names:
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def print_race(title: str, seconds: dict, batch_size: int, reference: str, flops: dict | None = None) -> None:
    """One line per contender; with ``flops`` (per call) also TFLOP/s and MFU against the chip's peak."""
    kind, peak = peak_flops()
    print(f"\n{title}")
    versus = "x " + reference
    width = max(12, *(len(name) + 1 for name in seconds))
    head = f"  {'':<{width}}{'wall ms':>10}{'ex/s':>8}{versus:>12}{'CPU ms':>10}{'ex/CPU s':>10}{versus:>12}"
    print(head + (f"{'TFLOP/s':>9}{'MFU':>7}" if flops else ""))
    ref = seconds[reference]
    for name, s in seconds.items():
        line = (
            f"  {name:<{width}}{1e3 * s['wall']:10.1f}{batch_size / s['wall']:8.1f}"
            f"{ref['wall'] / s['wall']:12.2f}"
            f"{1e3 * s['cpu']:10.1f}{batch_size / s['cpu']:10.1f}{ref['cpu'] / s['cpu']:12.2f}"
        )
        if flops:
            rate = flops[name] / s["wall"]
            line += f"{rate / 1e12:9.2f}" + (f"{rate / peak:7.1%}" if peak else f"{'n/a':>7}")
        print(line)
    if flops:
        print(
            f"  MFU against {kind}'s dense bf16 peak"
            + (f" {peak / 1e12:.0f} TFLOP/s" if peak else ": unknown chip")
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_race_arguments(parser, repeats=7)
    parser.add_argument("--no-gaml", action="store_true", help="Skip our GAML step.")
    parser.add_argument("--no-forward", action="store_true", help="Skip the forward comparison.")
    parser.add_argument(
        "--variants",
        default="",
        help=f"Comma-separated what-if forms of our step: {sorted(VARIANTS)} or xla:NAME=VALUE.",
    )
    parser.add_argument(
        "--gaml-variants", action="store_true", help="Race the variants of the GAML step too."
    )
    parser.add_argument(
        "--torch-dtype",
        choices=["float32", "bfloat16"],
        help="PyTorch's compute dtype, if not --dtype: ours in bfloat16 against its float32 step, say.",
    )
    args = race_sizes(parser.parse_args())
    batch_size, seq, repeats = args.batch, args.seq, args.repeats

    keep_to_cores(args.cores)
    # Before JAX starts; the process's allocator, so torch's step runs under it too.
    host_memory = keep_host_memory()
    import torch

    threads = torch_threads_as_xla(torch)
    torch.manual_seed(0)
    side = TorchSide(args.torch_dtype or args.dtype)
    config = ModelConfig(**SHAPES[args.shape], dtype=args.dtype)
    print(
        f"{args.shape}: {config.num_hidden_layers} layers x {config.hidden_size}, "
        f"{config.num_attention_heads} heads, intermediate {config.intermediate_size}, "
        f"vocab {config.vocab_size}; compute {args.dtype} (PyTorch {side.dtype}); "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"torch {torch.__version__} on {side.device} with {torch.get_num_threads()} threads; "
        f"{threads} cores; host memory {host_memory} (gaml_jax.host_memory); "
        f"median of {repeats} alternating calls"
    )
    params = MultiExitBert(config).init(jax.random.key(0), jnp.ones((1, seq), jnp.int32))["params"]
    params = jax.device_put(params)
    batch = make_batch(batch_size, seq, config.vocab_size)
    device_batch = jax.device_put(batch)

    variants = [v for v in args.variants.split(",") if v]
    for name in variants:
        what = VARIANTS[name][0] if name in VARIANTS else f"XLA option {name[4:]}"
        print(f"  variant {name}: {what}")
    contenders = {"ours CE": jax_step(config, params, "ce", device_batch)}
    for name in variants:
        if name not in GAML_ONLY:
            contenders[f"ours CE {name}"] = jax_step(
                config, params, "ce", device_batch, **variant_options(name)
            )
    contenders["torch CE"] = torch_step(config, side, batch)
    if not args.no_gaml:
        contenders["ours GAML"] = jax_step(config, params, "gaml", device_batch)
        for name in variants:
            if name in GAML_ONLY or args.gaml_variants:
                contenders[f"ours GAML {name}"] = jax_step(
                    config, params, "gaml", device_batch, **variant_options(name)
                )
    what_ifs = set(contenders) - set(BASELINES)  # may leave the race; the baselines may not
    compile_contenders(contenders, may_fail=what_ifs)
    seconds = race(contenders, repeats, may_fail=what_ifs)

    # Each contender's FLOPs as it computes them: ours skips the last layer's other rows.
    def computed(name: str) -> float:
        cls_only = name.startswith("ours") and "all-rows-last" not in name
        cls_only = cls_only and MultiExitBert(config).cls_only_layer() is not None  # the model's own rule
        return (5 if "GAML" in name else 3) * forward_flops(config, batch_size, seq, cls_only)

    flops = {name: computed(name) for name in contenders}
    print_race(f"train step, batch {batch_size} x seq {seq}", seconds, batch_size, "torch CE", flops)
    ours, theirs = seconds["ours CE"], seconds["torch CE"]
    print(
        f"  ours CE / torch CE examples/s: {theirs['wall'] / ours['wall']:.2f}x on the wall clock, "
        f"{theirs['cpu'] / ours['cpu']:.2f}x per CPU second (target >= 1.2)"
    )
    if not args.no_gaml:
        gaml = seconds["ours GAML"]
        print(
            f"  ours GAML step / ours CE step: {gaml['wall'] / ours['wall']:.2f} wall, "
            f"{gaml['cpu'] / ours['cpu']:.2f} CPU (FLOP floor 5/3)"
        )
    for name in variants:
        for method in ("CE", "GAML"):
            if f"ours {method} {name}" in seconds:
                alt, base = seconds[f"ours {method} {name}"], seconds[f"ours {method}"]
                print(
                    f"  ours {method} {name} / ours {method}: {alt['wall'] / base['wall']:.3f} of the wall "
                    f"time, {alt['cpu'] / base['cpu']:.3f} of the CPU time"
                )

    if not args.no_forward:
        for b, s in ((1, 32), (32, 64)):
            fwd_batch = make_batch(b, s, config.vocab_size, seed=1)
            seconds = race(
                {
                    "ours": jax_forward(config, params, jax.device_put(fwd_batch)),
                    "torch": torch_forward(config, side, fwd_batch),
                },
                repeats * (5 if b == 1 else 1),
            )
            print_race(f"forward (every exit's logits), batch {b} x seq {s}", seconds, b, "torch")


if __name__ == "__main__":
    main()
