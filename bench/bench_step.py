"""What GAML costs per step, measured side by side in one run.

For MiniLM (6 x 384) and BERT-base (12 x 768) shapes, times the jitted train step of
  ce          plain multi-exit CE (one forward, one backward),
  gaml/vjp    GAML with one forward and two pull-backs (the default),
  gaml/grad   GAML with two independent jax.grad calls (the design card's literal form),
and prints the ratios to the CE-only step (the floor is about 5/3: one forward and two
backwards against one of each), the compiled temporary memory (XLA's memory analysis) and
examples/s. The three steps' timed calls alternate, each round in the reverse order of the one
before (``bench_vs_torch.race``). Random weights: speed does not depend on them.

    python bench/bench_step.py            # both shapes, batch 32 x seq 128
    python bench/bench_step.py --quick    # MiniLM only, batch 16 x seq 64, fewer repeats
    python bench/bench_step.py --dtype bfloat16   # on a GPU/TPU
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_vs_torch import race  # noqa: E402
from gaml_jax.compilation import training_compiler_options  # noqa: E402
from gaml_jax.config import ModelConfig  # noqa: E402
from gaml_jax.host_memory import keep_host_memory  # noqa: E402
from gaml_jax.model import MultiExitBert  # noqa: E402
from gaml_jax.train_step import create_train_state, dropout_key, make_optimizer, train_step  # noqa: E402

SHAPES = {
    "MiniLM-L6-H384": dict(
        num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536
    ),
    "BERT-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
VARIANTS = {"ce": ("ce", "vjp"), "gaml/vjp": ("gaml", "vjp"), "gaml/grad": ("gaml", "grad")}


def make_batch(batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": jnp.asarray(rng.integers(1, vocab, (batch, seq)), jnp.int32),
        "attention_mask": jnp.ones((batch, seq), jnp.int32),
        "token_type_ids": jnp.zeros((batch, seq), jnp.int32),
        "labels": jnp.asarray(rng.integers(0, 2, batch), jnp.int32),
        "weights": jnp.ones((batch,), jnp.float32),
    }


def compile_variant(config: ModelConfig, params, batch, method: str, grad_mode: str):
    """(``run()``: one compiled step on ``batch``, waited for; the program's temporary bytes)."""
    model = MultiExitBert(config)
    tx = make_optimizer(
        method=method, total_steps=1000, learning_rate=2e-5, exit_learning_rate=2e-4, warmup_steps=10
    )
    # A private copy: the step donates its state, and the next variant needs the parameters.
    holder = {"state": create_train_state(jax.tree.map(jnp.copy, params), tx)}
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, grad_mode=grad_mode),
        donate_argnums=0,
        compiler_options=training_compiler_options(),  # the trainer's XLA options
    )
    rng = dropout_key(0)  # the trainer's dropout stream
    step = step.lower(holder["state"], batch, rng).compile()
    memory = step.memory_analysis()
    temp_bytes = getattr(memory, "temp_size_in_bytes", float("nan")) if memory is not None else float("nan")

    def run():
        holder["state"], metrics = step(holder["state"], batch, rng)
        jax.block_until_ready(metrics)

    return run, temp_bytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="MiniLM only, small batch, 2 repeats.")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"host memory: {keep_host_memory()} (gaml_jax.host_memory)")  # before JAX starts
    batch_size = args.batch or (16 if args.quick else 32)
    seq = args.seq or (64 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 3)
    shapes = ["MiniLM-L6-H384"] if args.quick else list(SHAPES)

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
        f"jax {jax.__version__}, batch {batch_size} x seq {seq}, compute {args.dtype}, median of {repeats}"
    )
    header = f"{'model':<16}{'variant':<11}{'step s':>9}{'x CE':>7}{'temp MiB':>10}{'x CE':>7}{'ex/s':>9}"
    print(header)
    print("-" * len(header))
    for name in shapes:
        config = ModelConfig(**SHAPES[name], dtype=args.dtype)
        params = MultiExitBert(config).init(jax.random.key(0), jnp.ones((1, seq), jnp.int32))["params"]
        batch = make_batch(batch_size, seq, config.vocab_size)
        compiled = {v: compile_variant(config, params, batch, *VARIANTS[v]) for v in VARIANTS}
        # The variants' calls alternate (bench_vs_torch.race): load on a shared machine hits all alike.
        seconds = race({v: run for v, (run, _) in compiled.items()}, repeats)
        results = {v: {"seconds": seconds[v]["wall"], "temp_bytes": compiled[v][1]} for v in VARIANTS}
        base = results["ce"]
        for variant, r in results.items():
            print(
                f"{name:<16}{variant:<11}{r['seconds']:>9.3f}{r['seconds'] / base['seconds']:>7.2f}"
                f"{r['temp_bytes'] / 2**20:>10.1f}{r['temp_bytes'] / base['temp_bytes']:>7.2f}"
                f"{batch_size / r['seconds']:>9.1f}"
            )
        vjp, grad = results["gaml/vjp"]["seconds"], results["gaml/grad"]["seconds"]
        print(f"{name}: shared forward (vjp) is {grad / vjp:.2f}x the speed of two jax.grad calls")


if __name__ == "__main__":
    main()
