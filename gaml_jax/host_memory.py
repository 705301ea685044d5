"""The host allocator: keep XLA:CPU's buffers' memory between steps instead of faulting it in anew.

On the CPU, XLA allocates each call's temporaries (721 MB for the MiniLM CE step at 32 x 64) and
outputs with ``malloc`` on its worker threads. glibc serves an allocation that large with a fresh
``mmap`` and gives it back with ``munmap`` when it is freed, so every step touches every page of
its temporaries for the first time: about 180,000 page faults per MiniLM step, 230-370 ms of kernel
time on two cores, 12-14% of the step's wall clock (docs/performance.md, 2026-12-05).

:func:`keep_host_memory` tells glibc (``mallopt``) to serve every thread from the one main heap
(``M_ARENA_MAX=1``: the other arenas cannot grow past 64 MB and mmap anything larger), never to
``mmap`` a block (``M_MMAP_MAX=0``) and never to return the heap's top to the system
(``M_TRIM_THRESHOLD=-1``). A step's buffers then reuse the pages of the step before: no page
faults once the heap has settled, the same numbers: the MiniLM CE step 1.14x as fast, GAML 1.05x.

What it costs: the process keeps its peak heap, which grows over the first steps before it
settles (the demo's peak RSS 4.5-4.7 GB against 2.8-3.2 GB), and with one arena for every thread
XLA compiles about twice as slowly (two MiniLM GAML steps at once: 10.1-10.4 s against 5.2 s;
one alone 6.5-7.0 s against 4.3-4.6 s), the threads queueing for the heap's lock. Two arenas
would compile as fast as glibc's defaults, but glibc serves a block too large for a second
arena's heaps (64 MB) with a fresh ``mmap`` even under ``M_MMAP_MAX=0``, and which thread lands in
which arena is a race: in three of six GAML processes the step's temporaries were faulted in anew
every step again (docs/performance.md, seventeenth session). So ``train.py``, whose steps outweigh its
compiling, calls it; ``eval.py`` and ``predict.py``, mostly compiling, do not.

It must run before JAX starts its CPU client: the client's worker threads pick their arena at
their first ``malloc``. It does nothing off Linux's glibc, when JAX is headed for an accelerator
(the device's memory is not ``malloc``'s), or when ``GAML_JAX_MALLOC_DEFAULTS=1`` is set (glibc's
defaults). With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set too, before the process starts,
transparent huge pages match kept memory's step in ``bench/bench_host_memory.py`` at no cost in
memory or compile time, but the whole demo ran 1.13x as long under them: a fresh huge page is
still zeroed, 150-195 ms of system time a step inside train.py (docs/performance.md, 2026-12-05,
eleventh session), so train.py does not restart itself with them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim

DEFAULTS_VARIABLE = "GAML_JAX_MALLOC_DEFAULTS"


def keep_host_memory() -> str:
    """Sets glibc's allocator to reuse the host memory of XLA:CPU's buffers from step to step.

    Call it before the first JAX computation (before ``jax.devices()``, an array, a ``jit``).

    Returns:
      What was done, in a few words: ``"kept"`` when the settings took; otherwise why not
      (``"not glibc"``, ``"accelerator"``, ``"GAML_JAX_MALLOC_DEFAULTS=1"``, ``"too late: JAX
      has started"``).
    """
    if os.environ.get(DEFAULTS_VARIABLE, "0") not in ("", "0"):
        return f"{DEFAULTS_VARIABLE}=1"
    if not on_glibc():
        return "not glibc"
    if _accelerator_expected():
        return "accelerator"
    if _jax_started():
        return "too late: JAX has started"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not all(libc.mallopt(parameter, value) for parameter, value in SETTINGS):
        return "mallopt refused"
    return "kept"


def on_glibc() -> bool:
    """Whether this process runs on Linux's glibc, whose ``mallopt`` :func:`keep_host_memory` calls."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _accelerator_expected() -> bool:
    """Whether JAX will pick a GPU or TPU backend, judged without starting it: the platforms
    asked for (``JAX_PLATFORMS``), else an installed accelerator plugin or libtpu."""
    import jax

    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return any(importlib.util.find_spec(name) is not None for name in ("libtpu", "jax_plugins"))


def _jax_started() -> bool:
    from jax._src import xla_bridge  # JAX has no public "are the backends up?"

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())
