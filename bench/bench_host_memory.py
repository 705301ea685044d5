"""The train step under glibc's defaults, with its buffers' memory kept, and with huge pages.

The allocator is a setting of the whole process, so each form runs in a process of its own
(``--child``), the forms alternating over rounds (each round in the reverse order of the one
before). Each process compiles our train step (random weights, ``bench_vs_torch``'s batch), runs a
warm-up step, then times ``--steps`` steps and prints medians of the wall clock and CPU time per
step (and the system time within the CPU time), the minor page faults per step, the process's peak
resident memory and the seconds its first call took (``1st s``: compiling each length and one step
each):

- ``defaults``: glibc's defaults (``GAML_JAX_MALLOC_DEFAULTS=1``): every step's temporaries are a
  fresh ``mmap``, faulted in page by page;
- ``kept``: :func:`gaml_jax.host_memory.keep_host_memory`, what train.py does;
- ``one-arena``: the form before the nineteenth session (``GAML_JAX_HOST_MEMORY=one-arena``): every
  thread served from the main heap, programs dispatched to XLA's threads as JAX does;
- ``huge-pages``: glibc's defaults with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (set before the
  process starts: glibc reads it only then), where the kernel allows transparent huge pages.

``--buckets`` cycles the batch through the demo's three padded lengths (32, 48, 64), as training
does, which shows how far the kept heap grows before it settles.

``--train`` runs the whole of ``train.py`` (the default config, a new workdir each time) under each
form instead and prints its wall clock, user and system CPU seconds and peak resident memory
(``--train-steps N`` shortens it to N steps). The step alone can mislead: huge pages timed as fast
as kept memory here, yet the whole demo ran 1.13x as long under them, with 8-10 times the system time
(docs/performance.md, eleventh session).

    python bench/bench_host_memory.py                          # MiniLM, CE and GAML, 32 x 64
    python bench/bench_host_memory.py --shape bert-base --methods gaml --steps 4
    python bench/bench_host_memory.py --buckets --steps 100 --methods ce --rounds 1
    python bench/bench_host_memory.py --train --forms kept,huge-pages   # the whole demo's training
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gaml_jax.host_memory import (  # noqa: E402  (the standard library only: JAX stays unstarted)
    DEFAULTS_VARIABLE,
    FORM_VARIABLE,
)

FORMS = {
    "defaults": {DEFAULTS_VARIABLE: "1"},
    "kept": {},
    "one-arena": {FORM_VARIABLE: "one-arena"},
    "huge-pages": {DEFAULTS_VARIABLE: "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
BUCKETS = (32, 48, 64)


def child(args: argparse.Namespace) -> None:
    """One form in this process: prints a JSON line of its medians."""
    from gaml_jax.host_memory import keep_host_memory

    status = keep_host_memory()  # before JAX starts, as train.py
    import jax
    import jax.numpy as jnp

    from bench.bench_vs_torch import SHAPES, bench_optimizer, make_batch
    from gaml_jax.compilation import training_compiler_options
    from gaml_jax.config import ModelConfig
    from gaml_jax.model import MultiExitBert
    from gaml_jax.train_step import create_train_state, dropout_key, train_step

    config = ModelConfig(**SHAPES[args.shape])
    model = MultiExitBert(config)
    params = model.init(jax.random.key(0), jnp.ones((1, args.seq), jnp.int32))["params"]
    tx = bench_optimizer(args.child_method)
    state = create_train_state(params, tx)
    rng = dropout_key(0)
    step = jax.jit(
        functools.partial(train_step, model=model, tx=tx),
        donate_argnums=0,
        compiler_options=training_compiler_options(),
    )
    lengths = BUCKETS if args.buckets else (args.seq,)
    batches = [jax.device_put(make_batch(args.batch, n, config.vocab_size, seed=n)) for n in lengths]
    start = time.perf_counter()
    for batch in batches:  # compiles each length, and warms up
        state, metrics = step(state, batch, rng)
        jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    wall, cpu, system, faults = [], [], [], []
    for i in range(args.steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, batches[i % len(batches)], rng)
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        after = resource.getrusage(resource.RUSAGE_SELF)
        system.append(after.ru_stime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    late = faults[len(faults) // 2 :]
    print(
        json.dumps(
            {
                "status": status,
                "first": first,
                "wall": statistics.median(wall),
                "cpu": statistics.median(cpu),
                "system": statistics.median(system),
                "faults": statistics.median(faults),
                "faults_late": statistics.median(late),
                "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                "ce": float(metrics["ce"]),
            }
        )
    )


def _form_env(form: str) -> dict[str, str]:
    """This process's environment with ``form``'s allocator settings in place of the caller's."""
    ours = (DEFAULTS_VARIABLE, FORM_VARIABLE, "GLIBC_TUNABLES")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    return {**env, **FORMS[form]}


def _rounds(forms: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, form) in the order run: each round in the reverse order of the one before
    (``bench_vs_torch.race_order``, imported here: the parent process needs no JAX before)."""
    from bench.bench_vs_torch import race_order

    return [(r, form) for r, order in enumerate(race_order(forms, rounds)) for form in order]


def run_form(form: str, method: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", form, "--child-method", method, "--shape", args.shape]
    command += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    command += ["--buckets"] if args.buckets else []
    result = subprocess.run(command, capture_output=True, text=True, env=_form_env(form))
    if result.returncode:
        sys.exit(f"{form} {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_train(form: str, args: argparse.Namespace) -> dict:
    """The whole train.py under ``form``, in a new workdir: its wall clock and resource usage."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [sys.executable, str(REPO / "train.py"), "--workdir", workdir]
        command += [f"--config.train.num_train_steps={args.train_steps}"] if args.train_steps else []
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_form_env(form)
        )
        with process.stdout:
            output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own usage, peak memory included
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"train.py under {form} failed:\n{output[-3000:]}")
    dev = [line for line in output.replace("\r", "\n").splitlines() if "dev accuracy" in line]
    return {
        "wall": wall,
        "user": usage.ru_utime,
        "sys": usage.ru_stime,
        "faults": usage.ru_minflt,
        "rss_gb": usage.ru_maxrss / 1e6,
        "dev": dev[-1].strip() if dev else "",
    }


def bench_train(forms: list[str], args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {form: [] for form in forms}
    for r, form in _rounds(forms, args.rounds):
        result = run_train(form, args)
        print(
            f"  round {r + 1}, {form}: {result['wall']:.1f} s wall, {result['user']:.1f} s user, "
            f"{result['sys']:.1f} s system, {result['faults']} page faults, "
            f"peak RSS {result['rss_gb']:.2f} GB",
            flush=True,
        )
        runs[form].append(result)
    print(f"\ntrain.py, {args.train_steps or 'the default'} steps, medians over {args.rounds} rounds")
    print(
        f"  {'form':<12}{'wall s':>8}{'x defaults':>11}{'user s':>8}{'system s':>10}{'faults':>11}"
        f"{'peak RSS GB':>13}"
    )
    base = runs.get("defaults")
    for form, results in runs.items():
        med = {key: statistics.median(x[key] for x in results) for key in ("wall", "user", "sys", "faults")}
        print(
            f"  {form:<12}{med['wall']:8.1f}{_times(base, 'wall', med['wall'] * 1e3):>11}{med['user']:8.1f}"
            f"{med['sys']:10.1f}{med['faults']:11.0f}{max(x['rss_gb'] for x in results):13.2f}"
        )
    same = len({x["dev"] for results in runs.values() for x in results}) == 1
    print(f"  the same last dev accuracies in every run: {same}")


def _times(base: list[dict] | None, key: str, ms: float) -> str:
    """How many times faster than glibc's defaults ``ms`` is (their median over ``ms``)."""
    return f"{statistics.median(x[key] for x in base) * 1e3 / ms:.2f}x" if base else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--methods", default="ce,gaml", help="Comma-separated: ce, ml, gaml.")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"Comma-separated, of {list(FORMS)}.")
    parser.add_argument("--steps", type=int, default=15, help="Timed steps per process.")
    parser.add_argument("--rounds", type=int, default=2, help="Processes per form and method.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--buckets", action="store_true", help="Cycle lengths 32, 48, 64 as training does.")
    parser.add_argument("--train", action="store_true", help="Time the whole train.py under each form.")
    parser.add_argument("--train-steps", type=int, default=0, help="--train: steps (0: the default run).")
    parser.add_argument("--child", default=None, choices=sorted(FORMS), help=argparse.SUPPRESS)
    parser.add_argument("--child-method", default="ce", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    forms = [f for f in args.forms.split(",") if f]
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        sys.exit(f"--forms: unknown {unknown}; choose from {list(FORMS)}.")
    if args.train:
        bench_train(forms, args)
        return
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(
        f"{args.shape}, batch {args.batch} x seq {'32/48/64' if args.buckets else args.seq}, "
        f"{args.steps} timed steps per process, {args.rounds} rounds alternating; "
        f"transparent huge pages: {thp.read_text().strip() if thp.exists() else 'n/a'}"
    )
    for method in [m for m in args.methods.split(",") if m]:
        runs: dict[str, list[dict]] = {form: [] for form in forms}
        for _, form in _rounds(forms, args.rounds):
            runs[form].append(run_form(form, method, args))
        print(f"\n{method} step")
        print(
            f"  {'form':<12}{'wall ms':>9}{'x defaults':>11}{'CPU ms':>9}{'x defaults':>11}{'system':>8}"
            f"{'faults/step':>13}{'2nd half':>10}{'peak RSS GB':>13}{'1st s':>7}  status"
        )
        base = runs.get("defaults")
        for form, results in runs.items():
            wall = statistics.median(x["wall"] for x in results) * 1e3
            cpu = statistics.median(x["cpu"] for x in results) * 1e3
            print(
                f"  {form:<12}{wall:9.0f}{_times(base, 'wall', wall):>11}"
                f"{cpu:9.0f}{_times(base, 'cpu', cpu):>11}"
                f"{statistics.median(x['system'] for x in results) * 1e3:8.0f}"
                f"{statistics.median(x['faults'] for x in results):13.0f}"
                f"{statistics.median(x['faults_late'] for x in results):10.0f}"
                f"{max(x['rss_gb'] for x in results):13.2f}"
                f"{statistics.median(x['first'] for x in results):7.1f}  {results[0]['status']}"
            )
        losses = {form: {x["ce"] for x in results} for form, results in runs.items()}
        same = len(set.union(*losses.values())) == 1
        print(f"  the same CE loss after the last step in every process: {same}")
        print("  (x defaults > 1: faster than glibc's defaults)")


if __name__ == "__main__":
    main()
