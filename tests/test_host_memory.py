"""gaml_jax.host_memory: XLA:CPU's buffers reuse their pages from call to call (no page faults)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from gaml_jax import host_memory
from tests import tiny

pytestmark = pytest.mark.skipif(not host_memory.on_glibc(), reason="glibc's allocator only")

# A train step in miniature: x -> x' (donated), with temporaries of 256 MB (as a train step's are,
# which glibc mmaps afresh on every call); prints the minor page faults of each of 40 calls.
PROBE = """
import functools, json, resource, sys
from gaml_jax.host_memory import keep_host_memory
status = keep_host_memory() if sys.argv[1] == "keep" else "not asked"
import jax, jax.numpy as jnp, numpy as np

@functools.partial(jax.jit, donate_argnums=0)
def step(x):  # the barriers keep y and z in buffers of their own, each as big as x
    y = jax.lax.optimization_barrier(jnp.sin(x) * x)
    z = jax.lax.optimization_barrier(jnp.cos(y) + y)
    return x + 1e-3 * y * z / (1.0 + jnp.abs(jnp.sum(y)) + jnp.abs(jnp.sum(z)))

x = jax.device_put(np.random.default_rng(0).standard_normal(32 * 2**20).astype(np.float32))
compiled = step.lower(x).compile()
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
temp = compiled.memory_analysis().temp_size_in_bytes
print(json.dumps({"status": status, "temp": temp, "faults": faults, "out": np.asarray(x[:4096]).tolist()}))
"""


def _run(script: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh Python process (one device, ``env`` added); asserts it succeeded."""
    result = subprocess.run(
        [sys.executable, "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tiny.REPO_ROOT,
        env={**os.environ, "XLA_FLAGS": "", **env},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _probe(mode: str, **env: str) -> dict:
    return json.loads(_run(PROBE, mode, **env).stdout.strip().splitlines()[-1])


def _faulting(probe: dict) -> int:
    """How many of the probe's calls faulted in at least half of their temporaries' pages anew."""
    pages = probe["temp"] / os.sysconf("SC_PAGE_SIZE")
    return sum(f >= 0.5 * pages for f in probe["faults"])


def test_kept_memory_takes_no_page_faults_where_glibc_takes_one_per_page():
    default = _probe("default")
    kept = _probe("keep")
    assert kept["status"] == "kept"
    assert default["temp"] >= 200 * 2**20, default  # big enough for glibc to mmap it
    # glibc's defaults: every call faults its temporaries in anew.
    assert _faulting(default) >= 0.9 * len(default["faults"]), default["faults"]
    # Kept: a call reuses the pages of the calls before. The heap settles over the first calls (up
    # to ~10 seen, and a late one now and then): a call still grows it when small allocations have
    # taken part of a freed block. Seen: 1-5 of 40 calls faulting, over five runs.
    assert _faulting(kept) <= 0.5 * len(kept["faults"]), kept["faults"]
    assert kept["out"] == default["out"]  # the same numbers, to the bit


# Compiles a program on a thread of its own, as train.py's compile_ahead does, then prints glibc's
# per-arena statistics (malloc_stats, to stderr: one "Arena N:" block per arena).
ARENAS = """
import ctypes, json, threading
from gaml_jax.host_memory import keep_host_memory
status = keep_host_memory()
import jax, jax.numpy as jnp
compile_one = lambda: jax.jit(lambda x: jnp.sin(x) @ x).lower(jnp.ones((64, 64))).compile()
thread = threading.Thread(target=compile_one)
thread.start()
thread.join()
print(json.dumps({"status": status, "async": jax.config.values["jax_cpu_enable_async_dispatch"]}), flush=True)
ctypes.CDLL("libc.so.6").malloc_stats()
"""


@pytest.mark.parametrize("form", ["", "one-arena"])
def test_compiling_threads_have_heaps_of_their_own(form):
    # XLA compiles malloc-heavy on several threads: served from the one main heap they queued for
    # its lock (about 1.5x the compile time). Kept memory takes the main heap for the calling
    # thread only, running the one-device program there rather than on XLA's threads.
    result = _run(ARENAS, **{host_memory.FORM_VARIABLE: form})
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    arenas = sum(line.startswith("Arena ") for line in result.stderr.splitlines())
    if form == "one-arena":
        assert probe == {"status": "kept, one arena", "async": True}
        assert arenas == 1, result.stderr
    else:
        assert probe == {"status": "kept", "async": False}
        assert arenas >= 2, result.stderr


def test_an_unknown_form_is_refused_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--workdir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tiny.REPO_ROOT,
        env={**os.environ, host_memory.FORM_VARIABLE: "two-arenas"},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "train.py: error: GAML_JAX_HOST_MEMORY='two-arenas': unknown; unset it, or set it to one-arena."
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_defaults_variable_turns_it_off():
    probe = _probe("keep", **{host_memory.DEFAULTS_VARIABLE: "1"})
    assert probe["status"] == f"{host_memory.DEFAULTS_VARIABLE}=1"
    assert _faulting(probe) >= 0.9 * len(probe["faults"]), probe["faults"]


def test_nothing_is_done_for_an_accelerator_or_once_jax_has_started(monkeypatch):
    asked = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gaml_jax.host_memory import keep_host_memory; print(keep_host_memory())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tiny.REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cuda,cpu"},
    )
    assert asked.stdout.strip() == "accelerator", asked.stderr[-2000:]
    jax.devices()  # this process's JAX has started
    monkeypatch.delenv(host_memory.DEFAULTS_VARIABLE, raising=False)
    assert host_memory.keep_host_memory() == "too late: JAX has started"
