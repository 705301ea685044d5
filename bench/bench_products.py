"""The train step's dense products alone: ours (XLA, as the model forms them) against PyTorch's.

Where ``bench_vs_torch.py`` races whole steps, this races the products inside them, one at a time:
each Dense of a BERT layer (query, key, value and attention output: hidden -> hidden; the
feed-forward's hidden -> intermediate and intermediate -> hidden) over the step's tokens, its
forward (``x @ kernel``) and its backward (the input's and the kernel's gradients together).
Ours is what the model runs: Flax's Dense product through ``model._dense_dot_general`` (the
transposed kernel gradients in float32, the bfloat16-into-float32 products in bfloat16), jitted
alone; the backward is the product's VJP, the forward's product left out by XLA as unused.
PyTorch's is ``torch.nn.functional.linear`` on its ``[out, in]`` weight (MKL or oneDNN on a CPU),
under ``torch.autocast`` for bfloat16; its backward is ``torch.autograd.grad`` of a kept graph.
On both sides the weight is a float32 parameter cast in the product, the input comes in the
compute dtype (XLA fuses our cast into the LayerNorm or GELU that makes it), and no bias is added.

Each timed call is a burst of back-to-back calls of one product (about 50 ms of them,
:func:`burst`), as a step runs its products with the threads awake: a call of a few milliseconds
alone times the threads' waking and the caches that the other side's call left as much as the
product. The bursts alternate between the two sides (``bench_vs_torch.race``).

The last lines weigh each product by how often one layer runs it (4, 1, 1) and by the model's
layers: the products' share of a CE step as both sides would spend it (one forward, one backward;
the [CLS]-only last layer aside), so a gap between the whole steps can be set against the gap
between the libraries' products.

    python bench/bench_products.py                         # MiniLM shape, 32 x 64 tokens, float32
    python bench/bench_products.py --shape bert-base --dtype bfloat16
    python bench/bench_products.py --cores 1               # both on one core
    python bench/bench_products.py --quick                 # 8 x 32 tokens, 3 repeats
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_vs_torch import (  # noqa: E402
    SHAPES,
    add_race_arguments,
    keep_to_cores,
    race,
    race_sizes,
    torch_threads_as_xla,
)
from gaml_jax import model as model_lib  # noqa: E402

# Flax's Dense contracts its input's last axis with the kernel's first.
_DENSE = (((2,), (0,)), ((), ()))


def layer_products(shape: dict) -> list[tuple[str, int, int, int]]:
    """(name, input width, output width, how many a layer runs) of a BERT layer's dense products."""
    hidden, intermediate = shape["hidden_size"], shape["intermediate_size"]
    return [
        ("query/key/value/output", hidden, hidden, 4),
        ("feed-forward in", hidden, intermediate, 1),
        ("feed-forward out", intermediate, hidden, 1),
    ]


def ours(dtype: str) -> tuple[Callable, Callable]:
    """Our (forward, backward) of one Dense product, jitted: ``(x, kernel) -> y`` and
    ``(x, kernel, ct) -> (dx, dkernel)``. The kernel is a float32 parameter, cast to the compute
    dtype inside as Flax's Dense does; ``x`` comes in the compute dtype, as XLA hands it on from
    the LayerNorm or GELU that makes it, with the cast fused in."""
    compute = jnp.dtype(dtype)

    def dense(x, kernel):
        return model_lib._dense_dot_general(x, kernel.astype(compute), _DENSE)

    def backward(x, kernel, cotangent):
        y, pull_back = jax.vjp(dense, x, kernel)
        return pull_back(cotangent.astype(y.dtype))  # float32 but for XLA's narrow bfloat16 form

    return jax.jit(dense), jax.jit(backward)


def burst(call: Callable[[], object], seconds: float = 0.05) -> tuple[Callable[[], None], int]:
    """``call`` repeated back to back for about ``seconds`` (as measured by a few warm calls), and
    how many times: a median of the bursts' times over that count is a call's time."""
    call()
    start = time.perf_counter()
    for _ in range(3):
        call()
    count = max(1, math.ceil(seconds / max((time.perf_counter() - start) / 3, 1e-6)))

    def run() -> None:
        for _ in range(count):
            call()

    return run, count


def contenders(torch, dtype: str, tokens: tuple[int, int], width_in: int, width_out: int, seed: int = 0):
    """The four calls for one product: ours and PyTorch's forward (``y``) and backward (``(dx,
    dkernel)``, PyTorch's weight gradient in its ``[out, in]`` layout), each returning its result
    once computed. PyTorch's: ``torch.nn.functional.linear`` on an ``[out, in]`` float32 weight
    under autocast for bfloat16 (cast in the product, as in a layer), ``x`` in the compute dtype as
    for ours; its backward differentiates a graph built once (``retain_graph``), so that only the
    backward is timed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*tokens, width_in), np.float32)
    kernel = (0.02 * rng.standard_normal((width_in, width_out))).astype(np.float32)
    cotangent = rng.standard_normal((*tokens, width_out), np.float32)
    forward, backward = ours(dtype)
    jx, jk, jct = jnp.asarray(x, dtype), jnp.asarray(kernel), jnp.asarray(cotangent)
    tx = torch.from_numpy(x).to(getattr(torch, dtype)).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(kernel.T)).requires_grad_(True)

    def autocast():
        return torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16")

    def torch_forward():
        with torch.no_grad(), autocast():
            return torch.nn.functional.linear(tx, tw)

    with autocast():
        ty = torch.nn.functional.linear(tx, tw)
    tct = torch.from_numpy(cotangent).to(ty.dtype)
    return {
        "ours forward": lambda: jax.block_until_ready(forward(jx, jk)),
        "torch forward": torch_forward,
        "ours backward": lambda: jax.block_until_ready(backward(jx, jk, jct)),
        "torch backward": lambda: torch.autograd.grad(ty, (tx, tw), tct, retain_graph=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_race_arguments(parser, repeats=9, timed="Timed bursts")
    args = race_sizes(parser.parse_args())
    keep_to_cores(args.cores)
    import torch

    threads = torch_threads_as_xla(torch)
    shape = SHAPES[args.shape]
    tokens = args.batch * args.seq
    print(
        f"{args.shape}: the dense products of a layer over {args.batch} x {args.seq} = {tokens} tokens, "
        f"{args.dtype}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads; {threads} cores; median of {args.repeats} alternating calls"
    )
    print(
        f"\n  {'product':<24}{'in -> out':>12}{'pass':>10}{'ours ms':>10}{'torch ms':>10}"
        f"{'ours GFLOP/s':>14}{'torch GFLOP/s':>15}{'torch / ours':>14}"
    )
    totals = {"ours": 0.0, "torch": 0.0}
    for name, width_in, width_out, count in layer_products(shape):
        calls = contenders(torch, args.dtype, (args.batch, args.seq), width_in, width_out)
        bursts = {key: burst(call) for key, call in calls.items()}
        seconds = race({key: run for key, (run, _) in bursts.items()}, args.repeats)
        seconds = {key: {k: v / bursts[key][1] for k, v in s.items()} for key, s in seconds.items()}
        for which, products in (("forward", 1), ("backward", 2)):
            flops = 2 * products * tokens * width_in * width_out
            mine, yours = seconds[f"ours {which}"]["wall"], seconds[f"torch {which}"]["wall"]
            totals["ours"] += count * mine
            totals["torch"] += count * yours
            widths = f"{width_in} -> {width_out}"
            print(
                f"  {name:<24}{widths:>12}{which:>10}{1e3 * mine:10.2f}{1e3 * yours:10.2f}"
                f"{flops / mine / 1e9:14.0f}{flops / yours / 1e9:15.0f}{yours / mine:14.2f}"
            )
    layers = shape["num_hidden_layers"]
    print(
        f"\n  one layer's products, forward and backward: ours {1e3 * totals['ours']:.1f} ms, "
        f"PyTorch's {1e3 * totals['torch']:.1f} ms (torch / ours {totals['torch'] / totals['ours']:.2f})"
    )
    print(
        f"  x {layers} layers: ours {1e3 * layers * totals['ours']:.0f} ms, PyTorch's "
        f"{1e3 * layers * totals['torch']:.0f} ms of a CE step's products (attention's and the exits' aside)"
    )


if __name__ == "__main__":
    main()
