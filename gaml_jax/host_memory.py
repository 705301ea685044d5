"""The host allocator: keep XLA:CPU's buffers' memory between steps instead of faulting it in anew.

On the CPU, XLA allocates each call's temporaries (721 MB for the MiniLM CE step at 32 x 64)
and outputs with ``malloc`` on the thread that runs the program. glibc serves an allocation that
large with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed, so every step
touches every page of its temporaries for the first time: about 180,000 page faults per MiniLM
step, 230-370 ms of kernel time on two cores, 12-14% of the step's wall clock
(docs/performance.md, 2026-12-05).

:func:`keep_host_memory` tells glibc (``mallopt``) never to ``mmap`` a block of its main heap
(``M_MMAP_MAX=0``) and never to return that heap's top to the system (``M_TRIM_THRESHOLD=-1``),
and tells JAX to run a one-device program in the thread that calls it rather than on XLA's worker
threads (``jax_cpu_enable_async_dispatch=False``). That caller is the main thread, whose heap is
the main one, so a step's buffers reuse the pages of the step before: no page faults once the heap
has settled, the same numbers (the MiniLM CE step 1.14x as fast, GAML 1.05x, measured with the
one-heap form below; docs/performance.md).

Every other thread keeps an arena of its own, as glibc gives it. Until the nineteenth session
every thread was served from the main heap (``M_ARENA_MAX=1``): XLA's worker threads allocated
the step's temporaries, and a thread of another arena gets a block that large (over that arena's
64 MB heaps) as a fresh ``mmap`` whatever ``M_MMAP_MAX`` says. But XLA's compiling threads then
queued for the one heap's lock. On a 2-core AVX2 CPU, alternating processes: the MiniLM GAML
step's three lengths compiled two at a time in 20-25 s against 30-37 s, CE's in 19-21 s against
28 s, the steps no slower; the demo's train.py compiled in 20.1-27.9 s against 28.4-36.2 s
(docs/performance.md, nineteenth session). That form stays for comparison, under
``GAML_JAX_HOST_MEMORY=one-arena``.

What it costs: the process keeps its peak heap, which grows over the first steps before it
settles (the demo's peak RSS 4.5-4.7 GB against glibc's defaults' 2.8-3.2 GB, measured with the
one-heap form; 60 steps of train.py peaked at 3.4-4.0 GB now, 4.2-5.0 GB one-heap). A program on
several CPU devices (``--xla_force_host_platform_device_count``; likely several processes too)
still runs on XLA's threads, and a step called from a thread other than the main one allocates
from that thread's arena: their temporaries are faulted in anew each step, as under glibc's
defaults. ``eval.py`` and ``predict.py``, mostly compiling small programs, keep glibc's defaults.

It must run before JAX starts its CPU client, which reads the dispatch setting when it starts. It
does nothing off Linux's glibc, when JAX is headed for an accelerator (the device's memory is not
``malloc``'s), or when ``GAML_JAX_MALLOC_DEFAULTS=1`` is set (glibc's defaults). With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set too, before the process starts, transparent huge
pages match kept memory's step in ``bench/bench_host_memory.py`` at no cost in memory, but the whole
demo ran 1.13x as long under them: a fresh huge page is still zeroed, 150-195 ms of system time a
step inside train.py (docs/performance.md, 2026-12-05, eleventh session), so train.py does not
restart itself with them.
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
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim
# The form before: every thread served from the main heap, programs dispatched as JAX does.
ONE_ARENA_SETTINGS = ((M_ARENA_MAX, 1), *SETTINGS)

DEFAULTS_VARIABLE = "GAML_JAX_MALLOC_DEFAULTS"
FORM_VARIABLE = "GAML_JAX_HOST_MEMORY"  # "one-arena": the form before (for benchmarks)


def keep_host_memory() -> str:
    """Sets glibc's allocator to reuse the host memory of XLA:CPU's buffers from step to step.

    Call it before the first JAX computation (before ``jax.devices()``, an array, a ``jit``).

    Returns:
      What was done, in a few words: ``"kept"`` when the settings took (``"kept, one arena"``
      under ``GAML_JAX_HOST_MEMORY=one-arena``); otherwise why not
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
    form = os.environ.get(FORM_VARIABLE, "")
    if form not in ("", "one-arena"):
        raise ValueError(f"{FORM_VARIABLE}={form!r}: unknown; unset it, or set it to one-arena.")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ONE_ARENA_SETTINGS if form else SETTINGS
    if not all(libc.mallopt(parameter, value) for parameter, value in settings):
        return "mallopt refused"
    if form:
        return "kept, one arena"
    import jax

    # The calling thread runs a one-device program and allocates its buffers: from the main heap.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
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
