"""JAX's persistent compilation cache, on by default for train.py and eval.py.

A second run of the same programs (the train step for each length bucket, the evaluation and
early-exit programs) then loads them from disk instead of compiling them again: on the 2-core
CPU of the demo this turns about a minute of compiling into seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

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
