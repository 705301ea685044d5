"""Compile time: the persistent cache on a short train.py run, and remat / scan of the layers.

``--train`` runs the default training (MiniLM, Rotten Tomatoes, GAML, the three length buckets)
for a few steps twice, in fresh processes sharing one new cache folder: cold (empty cache), then
warm. For each it prints the seconds from the start of training to the end of step 1, the run's
total, and the seconds of wall clock during which JAX was compiling or loading compiled programs
from the cache (the union of XLA's backend compilations' time spans, from ``jax.monitoring``:
programs compiled at once count once) with the number of programs compiled and loaded from the
cache. The default 40 steps meet all three buckets, as a whole ``make demo`` does; ``--eval``
then runs the demo's ``eval.py --speedup 2`` on each run and adds its compile time.
``--first-call`` first runs the same with every program compiled when first called, one at a
time (``trainer.COMPILE_AHEAD = False``, the form before programs were compiled ahead).

``--variants`` compiles the GAML train step of the model with its layers unrolled
(the default), with every tensor concatenated into the flat optimizer's vectors (``all-flat``:
``make_optimizer(own_group_size=None)``, the form before large tensors were groups of their own),
with the optimizer chain per tensor rather than on flat vectors (``tree-opt``:
``make_optimizer(flat=False)``, the form before the flat one), with a kernel per tensor and
layer (``per-tensor``: ``compilation.SHARE_KERNELS`` off, the form before kernels were shared by
same-shaped tensors), scanned
(``model.scan_layers=True``: one compiled layer body), scanned with every layer under
``nn.remat``, each compiled with the trainer's options (``compilation.training_compiler_options``:
XLA:CPU's FAST_COMPILE preset), and unrolled with XLA's default options; for
each it prints the seconds to trace and lower, to compile, and to load the compiled program back
(what a run that finds it in the persistent cache pays instead), then times each step (CPU
seconds, alternating). (The variant with the layers' parameters stored stacked, under ``nn.scan``,
is in this file at commit d7b7471.) XLA flags
apply as usual, e.g. ``XLA_FLAGS=--xla_cpu_opt_preset=FAST_COMPILE``.

    python bench/bench_compile.py --train --eval              # make demo's compiling, cold and warm
    python bench/bench_compile.py --train --first-call        # compiled at first call, then ahead
    python bench/bench_compile.py --train --steps 20 --scan   # it, then with model.scan_layers=True
    python bench/bench_compile.py --variants             # MiniLM shape, batch 32 x seq 64
    python bench/bench_compile.py --variants --quick     # batch 8 x seq 32
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- --train


def _listen_to_compiles():
    """(durations by event name, event counts) that JAX's monitoring fills from now on."""
    import jax

    durations: dict[str, list[float]] = collections.defaultdict(list)
    events: collections.Counter = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: durations[name].append(secs)
    )
    jax.monitoring.register_event_time_span_listener(
        lambda name, start, end, **kw: durations[f"{name}:spans"].append((start, end))
    )
    jax.monitoring.register_event_listener(lambda name, **kw: events.update([name]))
    return durations, events


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds of wall clock covered by at least one of the (start, end) spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _compile_summary(durations, events) -> dict:
    # XLA's backend compilations, a load from the persistent cache included (jax.monitoring).
    event = "/jax/core/compile/backend_compile_duration"
    backend = durations.get(event, [])
    return {
        # Wall clock with a compilation under way: programs compiled at once count once.
        "compile_s": _covered(durations.get(f"{event}:spans", [])),
        "compile_sum_s": sum(backend),
        "compiled": len(backend),
        "cache_hits": sum(n for e, n in events.items() if e.endswith("cache_hits")),
        "cache_misses": sum(n for e, n in events.items() if e.endswith("cache_misses")),
    }


def _eval_child(workdir: str) -> None:
    """``eval.py --workdir W --speedup 2`` (the demo's second command) in this process; prints a
    JSON line of its compile time."""
    import runpy

    durations, events = _listen_to_compiles()
    start = time.perf_counter()
    sys.argv = ["eval.py", "--workdir", workdir, "--speedup", "2"]
    try:
        runpy.run_path(str(REPO / "eval.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code:
            raise
    print(json.dumps({"eval_s": time.perf_counter() - start, **_compile_summary(durations, events)}))


def _train_child(steps: int, workdir: str, scan_layers: bool, first_call: bool) -> None:
    """One short training run in this process; prints a JSON line of its timings."""
    start = time.perf_counter()
    from gaml_jax.host_memory import keep_host_memory

    keep_host_memory()  # as train.py does, before JAX starts
    import jax

    durations, events = _listen_to_compiles()

    import configs.default
    from gaml_jax import trainer
    from gaml_jax.compilation import CompiledAhead, enable_compilation_cache

    enable_compilation_cache()
    trainer.COMPILE_AHEAD = not first_call
    first_step: list[float] = []

    class TimedStep(CompiledAhead):  # notes when the first step's results exist
        def __call__(self, *args):
            out = super().__call__(*args)
            # Every step is waited for: the trainer queues steps ahead (it fetches metrics at log
            # steps), and a bucket's compile would otherwise be timed while queued steps run.
            jax.block_until_ready(out)
            if not first_step:
                first_step.append(time.perf_counter())
            return out

    make_parallel = trainer._parallel

    def timed_parallel(form, step_fn, mesh):
        parallel = make_parallel(form, step_fn, mesh)
        return parallel._replace(step=TimedStep(parallel.step.fn, parallel.step.key))

    trainer._parallel = timed_parallel
    config = configs.default.get_config()
    config.train.num_train_steps = steps
    config.train.log_every = steps
    config.model.scan_layers = scan_layers
    train_start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    end = time.perf_counter()
    print(
        json.dumps(
            {
                "to_step_1_s": first_step[0] - train_start,
                "train_s": end - train_start,
                "process_s": end - start,
                **_compile_summary(durations, events),
            }
        )
    )


def _child(args: list[str], env: dict, what: str) -> dict:
    command = [sys.executable, __file__, *args]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(steps: int, forms: tuple[str, ...], with_eval: bool) -> None:
    print(
        f"train.py's default run, {steps} steps{' then eval.py --speedup 2' if with_eval else ''}; "
        "each form: a new cache folder, cold then warm"
    )
    header = f"{'to step 1 s':>12}{'train s':>9}{'compile s':>11}{'compiled':>10}{'cache hits':>12}"
    if with_eval:
        header += f"{'eval compile s':>16}{'demo compile s':>16}"
    print(f"{'form':<11}{'run':<6}{header}")
    for form in forms:
        cache = tempfile.mkdtemp(prefix="gaml-xla-cache-")
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONPATH=str(REPO))
        for run in ("cold", "warm"):
            with tempfile.TemporaryDirectory(prefix="gaml-workdir-") as workdir:
                r = _child(
                    ["--train-child", "--steps", str(steps), "--workdir", workdir]
                    + (["--scan"] if form == "scan" else [])
                    + (["--first-call"] if form == "first-call" else []),
                    env,
                    f"{form} {run} run",
                )
                line = (
                    f"{form:<11}{run:<6}{r['to_step_1_s']:12.1f}{r['train_s']:9.1f}{r['compile_s']:11.1f}"
                    f"{r['compiled']:10d}{r['cache_hits']:12d}"
                )
                if with_eval:
                    e = _child(["--eval-child", "--workdir", workdir], env, f"{form} {run} eval.py")
                    line += f"{e['compile_s']:16.1f}{r['compile_s'] + e['compile_s']:16.1f}"
            print(line, flush=True)


# --------------------------------------------------------------------------- --variants


@contextlib.contextmanager
def remat_layers():
    """Within it, ``MultiExitBert`` builds every layer under ``nn.remat`` (activations recomputed
    in the backward pass); same parameter tree. Trace and compile inside it."""
    import flax.linen as nn

    from gaml_jax import model as m

    original = m.BertLayer
    # (self, hidden, bias, deterministic, queries): the last two shape the program
    m.BertLayer = nn.remat(original, static_argnums=(3, 4))
    try:
        yield
    finally:
        m.BertLayer = original


@contextlib.contextmanager
def kernels_per_tensor():
    """Within it, the step keeps its per-tensor and per-layer constants in its kernels
    (``compilation.SHARE_KERNELS`` off: the form before): one kernel per tensor's update and per
    layer's dropout-key hashing instead of one per shape. Trace and compile inside it."""
    from gaml_jax import compilation

    original = compilation.SHARE_KERNELS
    compilation.SHARE_KERNELS = False
    try:
        yield
    finally:
        compilation.SHARE_KERNELS = original


def compile_step(
    model, batch, rng, seq: int, compiler_options: dict | None = None, optimizer: dict | None = None
):
    """Traces and compiles the GAML step of ``model`` (its optimizer as made by default, or with
    ``make_optimizer``'s keyword arguments ``optimizer``): (compiled, state, trace s, compile s,
    load s, ops)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.serialize_executable import deserialize_and_load, serialize

    from gaml_jax.train_step import create_train_state, make_optimizer, train_step

    params = model.init(jax.random.key(0), jnp.ones((1, seq), jnp.int32))["params"]
    tx = make_optimizer(
        method="gaml",
        total_steps=1000,
        learning_rate=2e-5,
        exit_learning_rate=2e-4,
        warmup_steps=10,
        **(optimizer or {}),
    )
    state = create_train_state(params, tx)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=0)
    start = time.perf_counter()
    lowered = step.lower(state, batch, rng)
    lowered_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options)
    compile_s = time.perf_counter() - start
    ops = sum(line.count(" = ") for line in lowered.as_text().splitlines())
    # What a warm run pays instead of compile_s: loading the executable the cache holds.
    payload, in_tree, out_tree = serialize(compiled)
    start = time.perf_counter()
    deserialize_and_load(payload, in_tree, out_tree)
    load_s = time.perf_counter() - start
    return compiled, state, lowered_s, compile_s, load_s, ops


def bench_variants(batch_size: int, seq: int, repeats: int) -> None:
    import jax

    from bench.bench_vs_torch import SHAPES, make_batch
    from gaml_jax.compilation import training_compiler_options
    from gaml_jax.config import ModelConfig
    from gaml_jax.model import MultiExitBert
    from gaml_jax.train_step import dropout_key

    jax.config.update("jax_enable_compilation_cache", False)  # every variant compiles for real
    config = ModelConfig(**SHAPES["minilm"])
    batch = jax.device_put(make_batch(batch_size, seq, config.vocab_size))
    rng = dropout_key(0)  # the trainer's dropout stream
    flags = os.environ.get("XLA_FLAGS", "none")
    print(
        f"GAML train step, MiniLM shape, batch {batch_size} x seq {seq}; persistent cache off; "
        f"XLA_FLAGS {flags}"
    )
    print(f"{'variant':<12}{'trace+lower s':>14}{'compile s':>11}{'load s':>8}{'HLO ops':>9}")
    runs = {}
    ours = training_compiler_options()  # the trainer's: XLA:CPU's FAST_COMPILE preset
    unrolled, scanned = MultiExitBert(config), MultiExitBert(config.replace(scan_layers=True))
    for name, model, context, options, optimizer in (
        ("unrolled", unrolled, contextlib.nullcontext, ours, None),  # the default
        ("all-flat", unrolled, contextlib.nullcontext, ours, {"own_group_size": None}),  # no own groups
        ("tree-opt", unrolled, contextlib.nullcontext, ours, {"flat": False}),  # the optimizer per tensor
        ("per-tensor", unrolled, kernels_per_tensor, ours, None),  # no kernels shared by shapes
        ("scan", scanned, contextlib.nullcontext, ours, None),
        ("scan+remat", scanned, remat_layers, ours, None),
        ("xla-default", unrolled, contextlib.nullcontext, None, None),  # XLA's default options
    ):
        with context():
            compiled, state, lowered_s, compile_s, load_s, ops = compile_step(
                model, batch, rng, seq, options, optimizer
            )
        print(f"{name:<12}{lowered_s:14.1f}{compile_s:11.1f}{load_s:8.1f}{ops:9d}", flush=True)
        holder = {"state": state}

        def run(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], batch, rng)
            jax.block_until_ready(metrics)

        run()
        runs[name] = run
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    base = statistics.median(times["unrolled"])
    print(
        "step CPU seconds (median, alternating): "
        + ", ".join(
            f"{name} {statistics.median(t):.2f} ({statistics.median(t) / base:.2f}x)"
            for name, t in times.items()
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", action="store_true", help="Cold and warm short train.py runs.")
    parser.add_argument("--variants", action="store_true", help="Compile time of remat and scan.")
    parser.add_argument("--quick", action="store_true", help="--variants at batch 8 x seq 32, 2 repeats.")
    parser.add_argument(
        "--steps",
        type=int,
        default=40,
        help="--train: steps per run (the default config meets its 3 length buckets by step 33).",
    )
    parser.add_argument(
        "--eval", action="store_true", help="--train: then eval.py --speedup 2 on each run (as make demo)."
    )
    parser.add_argument(
        "--scan", action="store_true", help="--train: then again with the layers scanned (scan_layers=True)."
    )
    parser.add_argument(
        "--first-call",
        action="store_true",
        help="--train: first with each program compiled when first called (trainer.COMPILE_AHEAD off).",
    )
    parser.add_argument("--train-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eval-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        _train_child(args.steps, args.workdir, scan_layers=args.scan, first_call=args.first_call)
        return
    if args.eval_child:
        _eval_child(args.workdir)
        return
    if not (args.train or args.variants):
        parser.error("give --train and/or --variants")
    if args.train:
        forms = ("first-call",) * args.first_call + ("unrolled",) + ("scan",) * args.scan
        bench_train(args.steps, forms, with_eval=args.eval)
    if args.variants:
        bench_variants(8 if args.quick else 32, 32 if args.quick else 64, 2 if args.quick else 3)


if __name__ == "__main__":
    main()
