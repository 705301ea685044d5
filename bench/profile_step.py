"""Where our train step spends its time: a jax.profiler trace, summed per XLA operation.

Traces a few calls of the jitted step (random weights, ``bench_vs_torch``'s batch), reads the
trace's XSpace with ``jax.profiler.ProfileData`` (no TensorBoard needed), and attributes each
XLA operation's time to the JAX operation it was compiled from (the HLO's op_name metadata):
forward or backward pass, and matmuls, dropout, GELU, LayerNorm, attention, embeddings, the
optimizer. Then the top operations with their shapes. On a GPU times are kernel time on the
device; on the CPU, thread time summed over XLA's worker threads (run under ``taskset -c 0``
for a one-core picture that other load disturbs less).
``--dump DIR`` also keeps the optimised HLO and the trace (for TensorBoard's profile plugin).

    python bench/profile_step.py                       # MiniLM shape, CE step, batch 32 x seq 64
    python bench/profile_step.py --method gaml --top 30
    python bench/profile_step.py --dump /tmp/prof      # + HLO text and the trace files
    taskset -c 0 python bench/profile_step.py          # one core

On the CPU it also prints the time in which no operation's event runs on any XLA thread, and the
operations after which the longest such gaps begin (``idle_gaps``), and the operations that read
an operand XLA left in a transposed layout, strided unless they are the copy that undoes it
(``column_major_reads``: how the seventeenth session found the optimizer reading a kernel
gradient column-major).
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.bench_vs_torch import EXIT_LR, LR, SHAPES, WEIGHT_DECAY, make_batch  # noqa: E402
from gaml_jax.compilation import training_compiler_options  # noqa: E402
from gaml_jax.config import ModelConfig  # noqa: E402
from gaml_jax.host_memory import keep_host_memory  # noqa: E402
from gaml_jax.model import MultiExitBert  # noqa: E402
from gaml_jax.train_step import create_train_state, dropout_key, make_optimizer, train_step  # noqa: E402

# Trace events that are not XLA operations: the runtime's own bookkeeping and Python frames.
_NOT_OPS = ("ThreadpoolListener::", "ThunkExecutor::", "SlinkyThreadPool::", "end: ", "$", "Wait for ")


def trace_planes(trace_dir: Path) -> list:
    """The planes of the trace ``jax.profiler.trace`` wrote into ``trace_dir``."""
    from jax.profiler import ProfileData

    (xspace,) = trace_dir.rglob("*.xplane.pb")
    return list(ProfileData.from_file(str(xspace)).planes)


def op_times(planes: list) -> dict[str, float]:
    """Microseconds per XLA operation of a trace's ``planes`` (:func:`trace_planes`): GPU kernel
    time on a GPU, else the host's XLA thread time.

    On a GPU each kernel on the device's streams counts towards the HLO operation it was emitted
    for (the kernel's ``hlo_op`` statistic), or under the kernel's own name where that names a
    CUDA graph (``command_buffer_N``) or nothing: XLA names a fusion's kernel after the fusion,
    with "_" for "." (see :func:`hlo_ops`, which answers to both spellings).
    """
    totals: dict[str, float] = collections.defaultdict(float)
    devices = [plane for plane in planes if plane.name.startswith("/device:GPU")]
    for plane in devices:
        for line in plane.lines:
            if not line.name.startswith("Stream"):  # "XLA Ops" / "XLA Modules" repeat the streams
                continue
            for event in line.events:
                try:
                    stats = dict(event.stats)
                except (TypeError, ValueError):
                    stats = {}
                op = str(stats.get("hlo_op", ""))
                totals[event.name if not op or op.startswith("command_buffer") else op] += (
                    event.duration_ns / 1e3
                )
    if devices:
        if not totals:
            print(
                "no kernels in the trace's GPU streams; its lines:",
                [ln.name for p in devices for ln in p.lines],
            )
        return totals
    for start, end, name in host_op_events(planes):
        totals[name] += (end - start) / 1e3
    return totals


def host_op_events(planes: list) -> list[tuple[int, int, str]]:
    """(start ns, end ns, operation) of every XLA operation of a trace's ``planes`` on the host's
    XLA threads (the CPU), which run the operations."""
    return [
        (event.start_ns, event.start_ns + event.duration_ns, event.name)
        for plane in planes
        for line in plane.lines
        if line.name.startswith("tf_XLA")
        for event in line.events
        if not event.name.startswith(_NOT_OPS)
    ]


def idle_gaps(events: list[tuple[int, int, str]]) -> tuple[int, int, list[tuple[int, str, str]]]:
    """Where no operation's event runs on any thread: (idle ns, ns from the first start to the last
    end, the gaps as (ns, the operation whose event ended last before it, the one that starts it)),
    longest first.

    On the CPU an Eigen product's worker tasks and YNNPACK's helper tasks have no events of their
    own: a long gap after an operation is its tail (the sixteenth session found the feed-forward
    output's kernel gradient as Eigen's product so, 10-11 ms a layer), short ones are dispatch.
    """
    gaps, idle = [], 0
    if not events:
        return 0, 0, gaps
    ordered = sorted(events)
    first = ordered[0][0]
    last_end, last_name = ordered[0][1], ordered[0][2]
    for start, end, name in ordered[1:]:
        if start > last_end:
            gaps.append((start - last_end, last_name, name))
            idle += start - last_end
        if end > last_end:
            last_end, last_name = end, name
    gaps.sort(key=lambda gap: -gap[0])
    return idle, last_end - first, gaps


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """Operation name -> (opcode, result shape, the JAX operation it came from: metadata op_name)."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if m and m.group(1) not in ops:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(3), m.group(2), source.group(1) if source else "?")
    # GPU kernels are named after their fusion with "_" for "." and "-" (loop_add_fusion_3).
    ops.update({re.sub(r"[.\-]", "_", name): op for name, op in list(ops.items())})
    return ops


def column_major_reads(hlo_text: str) -> list[tuple[str, str, str]]:
    """(reader, operand, the operand's shape and layout) for each operation of a compiled program's
    entry computation that reads an array of two or more dimensions whose layout is not row-major
    (minor-to-major not descending): a transposition XLA left in the layout, which the reader reads
    strided unless it is the copy that undoes it. Readers that touch no data (a tuple's element, a
    bitcast) are left out."""
    entry = hlo_text[hlo_text.index("\nENTRY") :] if "\nENTRY" in hlo_text else hlo_text
    lines = re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", entry, re.MULTILINE)
    transposed = {}
    for name, rest in lines:
        layout = re.match(r"\(?\w+\[[\d,]*\]\{([\d,]*)\}\)? ", rest)
        if layout and layout.group(1).count(",") >= 1:
            minor_to_major = [int(d) for d in layout.group(1).split(",")]
            if minor_to_major != sorted(minor_to_major, reverse=True):
                transposed[name] = rest.split(" ", 1)[0].strip("()")
    reads = []
    for name, rest in lines:
        call = re.search(r" ([\w\-]+)\(([^)]*)\)", rest)
        if not call or call.group(1) in ("get-tuple-element", "bitcast", "tuple"):
            continue
        for operand in re.findall(r"%([\w.\-]+)", call.group(2)):
            if operand in transposed:
                reads.append((name, operand, transposed[operand]))
    return reads


def short_source(source: str) -> str:
    """An operation's op_name as the tables print it: ``layer_i`` for any layer, no ``jit(train_step)/``."""
    return re.sub(r"layer_\d+", "layer_i", source).removeprefix("jit(train_step)/")


def category(source: str) -> str:
    """Pass (forward / backward / rest of the step) and kind of a JAX operation, from its op_name."""
    phase = "backward" if "transpose(jvp(" in source else "forward" if "jvp(" in source else "step"
    if phase == "step":
        return "optimizer, losses, rest"
    if "Dropout" in source:
        kind = "dropout (random bits, mask)"
    elif re.search(r"/(dense|query|key|value)/(dot_general|transpose)", source):
        kind = "dense matmuls (projections, feed-forward)"
    elif "attention/self" in source and "dot_general" in source:
        kind = "attention matmuls"
    elif "attention/self" in source:
        kind = "attention softmax, scale, layout"
    elif "intermediate" in source:
        kind = "GELU"
    elif "LayerNorm" in source:
        kind = "LayerNorm"
    elif "embed" in source:
        kind = "embeddings (gather, gradient scatter)"
    else:
        kind = "other model ops"
    return f"{phase:<9}{kind}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="minilm", choices=sorted(SHAPES))
    parser.add_argument("--method", default="ce", choices=["ce", "ml", "gaml"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="Traced steps (after one warm-up).")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dump", default=None, help="Keep the HLO and the trace in this folder.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Compute dtype.")
    parser.add_argument("--no-flat", action="store_true", help="The optimizer on the tree of tensors.")
    args = parser.parse_args()
    print(f"host memory: {keep_host_memory()} (gaml_jax.host_memory)")  # before JAX starts

    config = ModelConfig(**SHAPES[args.shape], dtype=args.dtype)
    model = MultiExitBert(config)
    params = model.init(jax.random.key(0), jnp.ones((1, args.seq), jnp.int32))["params"]
    tx = make_optimizer(
        method=args.method,
        total_steps=10_000,
        learning_rate=LR,
        exit_learning_rate=EXIT_LR,
        warmup_steps=10,
        weight_decay=WEIGHT_DECAY,
        flat=not args.no_flat,
    )
    state = create_train_state(params, tx)
    batch = jax.device_put(make_batch(args.batch, args.seq, config.vocab_size))
    rng = dropout_key(0)  # the trainer's dropout stream
    step = jax.jit(  # with the trainer's XLA options
        functools.partial(train_step, model=model, tx=tx),
        donate_argnums=0,
        compiler_options=training_compiler_options(),
    )
    compiled = step.lower(state, batch, rng).compile()
    hlo_text = compiled.as_text()  # one rendering, for the dump, the tables and the layout scan
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(
        f"{args.shape} {args.method} step{' (tree optimizer)' if args.no_flat else ''}, {args.dtype}, "
        f"batch {args.batch} x seq {args.seq}: XLA cost analysis "
        f"{cost.get('flops', 0) / 1e9:.1f} GFLOP, {cost.get('bytes accessed', 0) / 2**30:.2f} GiB accessed"
    )
    out = Path(args.dump) if args.dump else Path(tempfile.mkdtemp(prefix="gaml-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.dump:
        (out / "step.hlo.txt").write_text(hlo_text)

    state, metrics = compiled(state, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(out / "trace")):
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, batch, rng)
            jax.block_until_ready(metrics)
        wall = time.perf_counter() - start
    planes = trace_planes(out / "trace")
    per_step = {name: us / args.steps for name, us in op_times(planes).items()}
    total = sum(per_step.values())
    ops = hlo_ops(hlo_text)
    timed = "GPU kernel" if jax.default_backend() == "gpu" else "XLA thread"
    print(
        f"traced {args.steps} steps: {wall / args.steps * 1e3:.1f} ms wall per step, "
        f"{total / 1e3:.1f} ms of {timed} time per step"
    )
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, us in per_step.items():
        if name not in ops and re.search(r"gemm|nvjet|cutlass|xmma|cudnn|fmha", name, re.IGNORECASE):
            by_category["library  cuBLAS / cuDNN kernels (matmuls, attention)"] += us
        else:
            by_category[category(ops.get(name, ("", "", "?"))[2])] += us
    print(f"\nTime per step by pass and kind\n{'ms':>9} {'share':>6}  pass     kind")
    for name, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"{us / 1e3:9.1f} {us / total:6.1%}  {name}")
    print(f"\nTop {args.top} operations")
    print(f"{'ms':>9} {'share':>6}  {'operation':<24}{'opcode':<8}{'shape':<22}from")
    for name, us in sorted(per_step.items(), key=lambda kv: -kv[1])[: args.top]:
        opcode, shape, source = ops.get(name, ("?", "?", "?"))
        where = short_source(source)[:80]
        print(f"{us / 1e3:9.1f} {us / total:6.1%}  {name:<24}{opcode:<8}{shape[:21]:<22}{where}")
    if jax.default_backend() == "cpu":
        idle, span, gaps = idle_gaps(host_op_events(planes))
        long = [gap for gap in gaps if gap[0] >= 1e6]
        print(
            f"\nNo operation's event on any XLA thread for {idle / 1e6 / args.steps:.1f} ms of each "
            f"{span / 1e6 / args.steps:.1f} ms step; {len(long) / args.steps:.1f} gaps of 1 ms or more a "
            f"step, {sum(g[0] for g in long) / 1e6 / args.steps:.1f} ms (an Eigen product's or YNNPACK "
            "fusion's tail has no events of its own). The operations before the longest:"
        )
        after = collections.defaultdict(list)
        for ns, before, _ in long:
            after[before].append(ns)
        for name, spans in sorted(after.items(), key=lambda kv: -sum(kv[1]))[:8]:
            opcode, shape, source = ops.get(name, ("?", "?", "?"))
            print(
                f"{sum(spans) / 1e6 / args.steps:9.1f} ms a step after {name} ({len(spans)} gaps, "
                f"{opcode} {shape[:21]}) {short_source(source)[:70]}"
            )
        reads = column_major_reads(hlo_text)
        print(
            f"\n{len(reads)} operations read an operand in a column-major (transposed) layout, "
            "strided unless they are the copy that undoes it:"
        )
        for name, operand, shape in sorted(reads, key=lambda r: -per_step.get(r[0], 0))[:8]:
            opcode, _, source = ops.get(name, ("?", "?", "?"))
            print(
                f"{per_step.get(name, 0) / 1e3:9.2f} ms a step  {name} ({opcode}) reads {operand} "
                f"{shape}  {short_source(source)[:60]}"
            )
    if args.dump:
        print(f"HLO in {out / 'step.hlo.txt'}, trace in {out / 'trace'}")


if __name__ == "__main__":
    main()
