"""Compiling less: JAX's persistent compilation cache, the train step's XLA:CPU options,
kernels shared by same-shaped tensors, and programs compiled ahead, several at once.

The persistent cache is on by default for train.py and eval.py. A second run of the same programs
(the train step for each length bucket, the evaluation and early-exit programs) then loads them
from disk instead of compiling them again: on the 2-core CPU of the demo this turns about a minute
of compiling into seconds. :func:`as_runtime_values` makes a first compile shorter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gaml_jax import runtime

# Beside the tokenised-data cache (configs/default.py: data.cache_dir = ~/.cache/gaml_jax/tokens).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "gaml_jax" / "xla"
# Programs that compile faster than this are not written (JAX's default is 1 s). 0: every
# program is, the small ones included: a demo's ~90 small programs (initialisation, data placement,
# early-exit compaction) were compiled again on every warm run, about 5 s in all, where loading
# them takes well under a second. A whole second demo (bench/bench_compile.py --train --eval,
# 2 cores) spent 12.1 s compiling or loading with 0.2 here (7 of 62 training programs loaded, the
# rest compiled) and 6.6 s with 0 (all 62 loaded; eval.py 0.7 s instead of 3.9 s).
MIN_COMPILE_SECONDS = 0.0
# XLA:CPU options of the train step: XLA's FAST_COMPILE preset. Measured side by side on a 2-core
# AVX2 CPU (bench/bench_cpu_options.py, MiniLM shape, 32 x 64, in both orders): tracing and
# compiling took 11-14% less (CE step 13.7 and 14.4 s against 15.7 and 16.1 s, GAML step 15.7 and
# 16.7 s against 18.2 and 17.7 s) and the step ran no slower (0.96-1.01x the time). The serving
# program has its own (runtime.CPU_SERVING_OPTIONS). GAML_JAX_XLA_DEFAULTS=1 keeps XLA's defaults
# for both.
CPU_TRAINING_OPTIONS = {"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}


def training_compiler_options() -> dict[str, str] | None:
    """``compiler_options`` of the train step: ``runtime.cpu_compiler_options(CPU_TRAINING_OPTIONS)``
    (None off the CPU: XLA's defaults)."""
    return runtime.cpu_compiler_options(CPU_TRAINING_OPTIONS)


# On the CPU, per-tensor constants (a tensor's offset in the flat optimizer's vectors, a layer's
# index among the dropout keys) reach the train step's kernels as run-time values
# (as_runtime_values), so that the kernels of same-shaped tensors and layers are one kernel.
# Measured side by side (bench/bench_compile.py --variants; docs/performance.md). False: as before.
SHARE_KERNELS = True


def shares_kernels() -> bool:
    """Whether :func:`as_runtime_values` hides its values: ``SHARE_KERNELS`` on the CPU backend."""
    return SHARE_KERNELS and jax.default_backend() == "cpu"


def as_runtime_values(values: tuple[jax.Array, ...], witness: jax.Array) -> tuple[jax.Array, ...]:
    """``values``, unchanged, as values XLA only knows at run time (on the CPU; elsewhere as given).

    XLA:CPU compiles one kernel per distinct fused computation and reuses it for identical ones.
    Two updates of same-shaped tensors, ``param + vector[offset:offset + size]``, differ only in
    their constant offset, and so compile twice; with the offset a run-time value they are one
    kernel. The values come out of a ``lax.while_loop`` whose condition never holds: its counter
    starts at ``witness``'s first element with the sign bit cleared (never negative, which XLA
    cannot prove from a value it only sees at run time), and it loops while the counter is
    negative. The loop's condition costs one scalar comparison per call.

    Args:
      values: integer or unsigned arrays, typically scalars.
      witness: any array computed at run time (never a constant), read for its first element.

    Returns:
      ``values``, equal element by element.
    """
    if not shares_kernels() or not values:
        return tuple(values)
    first = jnp.ravel(witness)[0].astype(jnp.float32)
    never_negative = jnp.bitwise_and(jax.lax.bitcast_convert_type(first, jnp.int32), jnp.int32(0x7FFFFFFF))
    # The body is never run; it only has to depend on its carry, else XLA folds the loop away.
    carry = jax.lax.while_loop(
        lambda c: c[0] < 0, lambda c: tuple(x * x + 1 for x in c), (never_negative, *values)
    )
    return carry[1:]


def enable_compilation_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache and returns its folder.

    The folder is ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's own variable), else
    ``cache_dir``, else ``~/.cache/gaml_jax/xla``. A cache that cannot be used (a read-only
    folder, say) only costs the compilations: JAX warns and compiles as usual.

    Args:
      cache_dir: the folder to use when ``$JAX_COMPILATION_CACHE_DIR`` is not set.

    Returns:
      The cache folder.
    """
    folder = Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or cache_dir or DEFAULT_CACHE_DIR).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder


# ---------------------------------------------------------------- programs compiled ahead

# How many programs compile_ahead compiles at once; None: as many as the host has cores, at least 2.
# XLA compiles a program mostly on one thread (its passes, code generation and linking; only the
# kernels fan out), and releases Python's lock while it does: on a 2-core CPU, the three length
# buckets' MiniLM GAML steps, lowered one after the other, compiled in 34-35 s of wall clock two or
# three at a time, against 44 s one at a time, for about the same CPU time (a scratch script;
# bench/bench_compile.py --train --first-call measures train.py; docs/performance.md).
AHEAD_WORKERS: int | None = None


class CompiledAhead:
    """A jitted function, with programs compiled ahead of its calls (:func:`compile_ahead`).

    ``key(*args)`` names the program a call needs (the training batch's padded length, say). A call
    whose key has a program compiled ahead runs that program; any other goes through the jitted
    function, which compiles it then, as jit always does. The arguments of a program compiled ahead
    must match its example's shapes, dtypes and shardings (JAX checks them).

    Args:
      fn: a function made by ``jax.jit`` (donation and compiler options carry over).
      key: maps a call's arguments to a hashable name of the program they need.
    """

    def __init__(self, fn: Callable, key: Callable[..., Hashable]):
        self.fn, self.key = fn, key
        self.programs: dict[Hashable, jax.stages.Compiled] = {}

    def __call__(self, *args):
        program = self.programs.get(self.key(*args)) if self.programs else None
        return (self.fn if program is None else program)(*args)


def compile_ahead(
    jobs: Sequence[tuple[CompiledAhead, tuple[Any, ...]]],
    *,
    workers: int | None = None,
    progress: Callable[[], None] | None = None,
    on_error: Callable[[CompiledAhead, Exception], None] | None = None,
) -> None:
    """Compiles each ``(function, example arguments)`` of ``jobs``, several at once, and keeps the
    programs in their functions (:class:`CompiledAhead`), for calls with the same key.

    Each job is traced and lowered in this thread, in order (tracing holds Python's lock), and
    compiled on a pool of ``workers`` threads (``AHEAD_WORKERS`` if None) while the next one is
    lowered. Jobs whose key already has a program, or repeats an earlier job's, are skipped. A
    program found in the persistent cache is loaded from it instead, as by jit. Returns when every
    program is ready; a compilation's error is raised here, or, with ``on_error``, passed to it
    while the other programs go on (that function then compiles at its first call, as jit does).

    Args:
      jobs: (function, example arguments): arrays or ``jax.ShapeDtypeStruct``, with the shardings
        of the calls to come; a donated argument is not consumed.
      workers: how many programs compile at once.
      progress: called once per program ready (a progress bar's update, say).
      on_error: called with the function and the exception of each compilation that fails.
    """
    todo, keys = [], set()
    for fn, args in jobs:
        key = fn.key(*args)
        if key not in fn.programs and (id(fn), key) not in keys:
            keys.add((id(fn), key))
            todo.append((fn, key, args))
    if not todo:
        return
    workers = workers or AHEAD_WORKERS or max(2, os.cpu_count() or 1)

    def compile_one(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        compiled = lowered.compile()
        if progress is not None:
            progress()
        return compiled

    with ThreadPoolExecutor(max_workers=min(workers, len(todo)), thread_name_prefix="compile") as pool:
        futures = [(fn, key, pool.submit(compile_one, fn.fn.lower(*args))) for fn, key, args in todo]
        for fn, key, future in futures:
            try:
                fn.programs[key] = future.result()
            except Exception as error:
                if on_error is None:
                    raise
                on_error(fn, error)
