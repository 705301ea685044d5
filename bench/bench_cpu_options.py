"""XLA:CPU compiler options, A against B, side by side in one process: the same programs compiled
with each set of options and timed in alternation (each call of A next to a call of B, so that
load on a shared machine hits both alike).

The programs (MiniLM-L6-H384 shape, random weights): early exit at batch 1 (``early_exit_program``,
one example of 32 tokens leaving at layer 3, and one running all 6 layers), the forward of
every exit at batch 32 x 64, and the CE and GAML train steps at 32 x 64 (AdamW, dropout), with
each program's compile time. B is by default ``gaml_jax.runtime.CPU_SERVING_OPTIONS``, which the
early-exit program (batch 1, exported) is compiled with: YNNPACK fusions off, so matrix products
go to XLA's own kernels (Eigen); A is XLA's defaults.

    python bench/bench_cpu_options.py                    # ~3 minutes on 2 CPU cores
    python bench/bench_cpu_options.py --b xla_cpu_use_xnnpack=false --quick
    python bench/bench_cpu_options.py --rng-a threefry2x32 --only train \\
        --a xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE --b xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE

``--rng-a`` / ``--rng-b`` pick each side's dropout PRNG for the train steps: ``trainer`` (the
default: ``train_step.DROPOUT_RNG_IMPL``, threefry2x32 written out, ``gaml_jax.prng``), JAX's
``threefry2x32`` (one loop per hash on the CPU), or ``rbg``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_vs_torch import SHAPES, bench_optimizer, make_batch  # noqa: E402
from gaml_jax.config import ModelConfig  # noqa: E402
from gaml_jax.early_exit import early_exit_program, serving_params  # noqa: E402
from gaml_jax.host_memory import keep_host_memory  # noqa: E402
from gaml_jax.model import MultiExitBert  # noqa: E402
from gaml_jax.runtime import CPU_SERVING_OPTIONS  # noqa: E402
from gaml_jax.train_step import DROPOUT_RNG_IMPL, create_train_state, train_step  # noqa: E402


def parse_options(items: list[str]) -> dict[str, str]:
    """["name=value", ...] -> {name: value}."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--a/--b take name=value (an empty value is allowed), got {item!r}")
        out[name] = value
    return out


RNG_IMPLS = {"trainer": DROPOUT_RNG_IMPL, "threefry2x32": "threefry2x32", "rbg": "rbg"}


def programs(options: dict[str, str], config: ModelConfig, params, quick: bool, rng: str = "trainer"):
    """name -> (compile seconds, run()) for the programs compiled with ``options``, the train steps
    drawing dropout masks with the PRNG ``RNG_IMPLS[rng]``."""
    key = jax.random.key(0, impl=RNG_IMPLS[rng])
    model = MultiExitBert(config)
    jit = functools.partial(jax.jit, compiler_options=options or None)

    def compiled(fn, *args, donate=()):
        """(seconds to trace, lower and compile, the compiled program)."""
        tic = time.perf_counter()
        exe = jit(fn, donate_argnums=donate).lower(*args).compile()
        return time.perf_counter() - tic, exe

    out = {}
    leaves, treedef = jax.tree.flatten(serving_params(model, params))
    program = early_exit_program(model, "patience", treedef, tolerance=0.0)
    ids = np.full((1, 32), 1000, np.int32)
    one = (leaves, ids, np.ones_like(ids), np.zeros_like(ids))
    seconds, exe = compiled(program, *one, np.float32(2))
    # Patience 2 stops once three exits agree (layer 3 at the earliest); one beyond the exits runs
    # every layer.
    for patience in (2, 99):
        layers = int(exe(*one, np.float32(patience))[2])
        out[f"early exit, batch 1 x 32, {layers} layers"] = (
            seconds if patience == 2 else 0.0,
            lambda patience=patience: jax.block_until_ready(exe(*one, np.float32(patience))),
        )
    batch = make_batch(8 if quick else 32, 32 if quick else 64, config.vocab_size)
    shape = f"{batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}"
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    seconds, forward = compiled(lambda p, *x: model.apply({"params": p}, *x).logits, params, *inputs)
    out[f"forward, {shape}"] = (seconds, lambda: jax.block_until_ready(forward(params, *inputs)))
    batch = jax.device_put(batch)
    for method in ("ce", "gaml"):
        tx = bench_optimizer(method)
        state = create_train_state(jax.tree.map(jnp.copy, params), tx)
        step = functools.partial(train_step, model=model, tx=tx)
        seconds, exe_step = compiled(step, state, batch, key, donate=0)
        holder = {"state": state}

        def run(holder=holder, exe_step=exe_step):
            holder["state"], metrics = exe_step(holder["state"], batch, key)
            jax.block_until_ready(metrics)

        out[f"{method.upper()} train step, {shape}"] = (seconds, run)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="*", default=[], help="options of A, name=value (default: none)")
    parser.add_argument(
        "--b",
        nargs="*",
        default=[f"{k}={v}" for k, v in CPU_SERVING_OPTIONS.items()],
        help="options of B (default: gaml_jax.runtime.CPU_SERVING_OPTIONS)",
    )
    for side in ("a", "b"):
        parser.add_argument(
            f"--rng-{side}",
            choices=sorted(RNG_IMPLS),
            default="trainer",
            help="dropout PRNG of the train steps",
        )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each train step")
    parser.add_argument("--quick", action="store_true", help="batch 8 x 32, 3 repeats")
    parser.add_argument(
        "--only", default="", help="time only the programs whose name holds one of these (comma-separated)"
    )
    args = parser.parse_args()
    print(f"host memory: {keep_host_memory()} (gaml_jax.host_memory)")  # before JAX starts
    if jax.default_backend() != "cpu":
        raise SystemExit(f"XLA:CPU options: run this on the CPU (the backend is {jax.default_backend()}).")
    a, b = parse_options(args.a), parse_options(args.b)
    repeats = 3 if args.quick else args.repeats
    config = ModelConfig(vocab_size=30522, num_labels=2, **SHAPES["minilm"])
    params = jax.device_put(
        MultiExitBert(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    )
    sides = {
        "A": programs(a, config, params, args.quick, args.rng_a),
        "B": programs(b, config, params, args.quick, args.rng_b),
    }
    print(
        f"A: {a or 'XLA defaults'}, dropout PRNG {args.rng_a}\n"
        f"B: {b or 'XLA defaults'}, dropout PRNG {args.rng_b}"
    )
    print(f"{'':40}{'A ms':>9}{'B ms':>9}{'A / B':>8}{'compile A s':>13}{'B s':>7}")
    only = args.only.split(",")
    for name in [name for name in sides["A"] if any(part in name for part in only)]:
        calls = repeats if "step" in name else 10 * repeats
        times = {side: [] for side in sides}
        for side in sides:
            sides[side][name][1]()  # a first call, untimed
        for _ in range(calls):
            for side in sides:
                tic = time.perf_counter()
                sides[side][name][1]()
                times[side].append(time.perf_counter() - tic)
        ta, tb = (statistics.median(times[s]) for s in sides)
        ca, cb = (sides[s][name][0] for s in sides)
        compile_cols = f"{ca:13.2f}{cb:7.2f}" if ca else ""
        print(f"{name:40}{ta * 1e3:9.2f}{tb * 1e3:9.2f}{ta / tb:7.2f}x{compile_cols}", flush=True)
    print(f"(medians; {jax.__version__}, {jax.devices()[0].device_kind}, {jax.device_count()} devices)")


if __name__ == "__main__":
    main()
