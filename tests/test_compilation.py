"""The persistent compilation cache: where it goes, and that a second process loads from it.

Each case runs in a fresh Python process: JAX sets its cache up once, at the first compilation.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Compiles one small program and reports the cache folder and JAX's cache-hit count.
CHILD = """
import json, sys
import jax, jax.numpy as jnp
from gaml_jax.compilation import enable_compilation_cache

hits = []
def listen(event, **kwargs):
    if event.endswith("cache_hits"):
        hits.append(event)
jax.monitoring.register_event_listener(listen)
folder = enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"folder": str(folder), "hits": len(hits)}))
"""


def _run(env_changes: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(env_changes, PYTHONPATH=str(REPO), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_folder_is_beside_the_token_cache_and_a_second_process_hits_it(tmp_path):
    env = {"HOME": str(tmp_path)}
    first = _run(env)
    folder = tmp_path / ".cache" / "gaml_jax" / "xla"
    assert Path(first["folder"]) == folder
    assert first["hits"] == 0 and any(folder.iterdir())
    assert _run(env)["hits"] >= 1


def test_environment_variable_wins_over_the_argument(tmp_path):
    chosen, ignored = tmp_path / "from_env", tmp_path / "from_argument"
    result = _run({"HOME": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": str(chosen)}, str(ignored))
    assert Path(result["folder"]) == chosen and any(chosen.iterdir()) and not ignored.exists()


def test_argument_is_used_without_the_environment_variable(tmp_path):
    chosen = tmp_path / "from_argument"
    result = _run({"HOME": str(tmp_path)}, str(chosen))
    assert Path(result["folder"]) == chosen and any(chosen.iterdir())
    assert not (tmp_path / ".cache").exists()


# ---------------------------------------------------------------------- XLA:CPU compiler options


def _ynn_ops(compiled) -> int:
    """YNNPACK fusions in a compiled program (its HLO; fusion kind ``__ynn_fusion``)."""
    return compiled.as_text().count('"kind":"__ynn_fusion"')


def test_the_serving_program_compiles_without_ynnpack_fusions(monkeypatch):
    """Early exit as one program takes ``CPU_SERVING_OPTIONS``; the runner's batch functions and
    the evaluation forward keep XLA's defaults; an environment variable or an XLA that does not
    know the options gives XLA's defaults."""
    import jax
    import numpy as np

    from gaml_jax import ModelConfig, MultiExitBert, runtime
    from gaml_jax.early_exit import EarlyExitRunner
    from gaml_jax.evaluator import make_predict_fn
    from tests import tiny

    model = MultiExitBert(ModelConfig(**tiny.TINY))
    params = jax.device_put(model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"])
    ids = np.full((1, 8), 5, np.int32)
    inputs = (ids, np.ones_like(ids), np.zeros_like(ids))
    full = lambda p, i, m, t: model.apply({"params": p}, i, m, t, True).logits
    default = _ynn_ops(jax.jit(full).lower(params, *inputs).compile())
    if not default:
        import pytest

        pytest.skip("this XLA:CPU emits no YNNPACK fusion for the model: nothing to turn off")
    assert runtime.serving_compiler_options() == runtime.CPU_SERVING_OPTIONS
    runner = EarlyExitRunner(model, params)
    program = runner.program("entropy").func  # the jitted program (a partial over the weights)
    assert _ynn_ops(program.lower(runner._program_leaves, *inputs, np.float32(0.5)).compile()) == 0
    assert _ynn_ops(runner._full.lower(runner.params, *inputs).compile()) == default
    batch = dict(zip(("input_ids", "attention_mask", "token_type_ids"), inputs, strict=True))
    assert _ynn_ops(make_predict_fn(model).lower(params, batch).compile()) == default

    for env, options in ((("GAML_JAX_XLA_DEFAULTS", "1"), {}), (None, {"xla_cpu_no_such_option": ""})):
        with monkeypatch.context() as m:
            if env:
                m.setenv(*env)
            if options:
                m.setattr(runtime, "CPU_SERVING_OPTIONS", options)
            assert runtime.serving_compiler_options() is None
            assert _ynn_ops(runtime.serving_jit(full).lower(params, *inputs).compile()) == default


def test_the_train_step_compiles_with_the_training_options(monkeypatch):
    """``shard_map_step`` compiles with ``training_compiler_options()`` (XLA:CPU's FAST_COMPILE
    preset on the CPU; none with GAML_JAX_XLA_DEFAULTS=1): an option XLA does not know, put in
    their place, fails the step's compilation."""
    import jax
    import numpy as np
    import pytest

    from gaml_jax import compilation, train_step

    assert compilation.training_compiler_options() == compilation.CPU_TRAINING_OPTIONS
    with monkeypatch.context() as m:
        m.setenv("GAML_JAX_XLA_DEFAULTS", "1")
        assert compilation.training_compiler_options() is None

    def step(state, batch, rng, axis_name):
        return state + jax.lax.psum(batch.sum(), axis_name), rng

    mesh = train_step.data_mesh(jax.devices()[:2])
    args = (np.float32(0), np.ones((2, 3), np.float32), np.float32(1))
    assert float(train_step.shard_map_step(step, mesh)(*args)[0]) == 6.0
    monkeypatch.setattr(train_step, "training_compiler_options", lambda: {"xla_cpu_no_such_option": ""})
    with pytest.raises(Exception, match="No such compile option"):
        train_step.shard_map_step(step, mesh)(*args)


# ---------------------------------------------------------------- kernels shared by same shapes


def _fused(compiled) -> set[str]:
    """A compiled program's distinct fused computations (its kernels), up to names."""
    import re

    blocks = [b for b in compiled.as_text().split("\n\n") if b.lstrip().startswith("%fused")]
    norm = lambda line: re.sub(r"%[\w.\-]+|param_\d+(\.\d+)?", "x", line.split(", metadata=")[0])
    return {"\n".join(norm(line) for line in b.strip().splitlines()) for b in blocks}


def _slicing_kernels(compiled) -> int:
    """Distinct fused computations of a compiled program that slice an array."""
    return sum("slice(" in b for b in _fused(compiled))


def _on_cpu_only():
    import jax
    import pytest

    if jax.default_backend() != "cpu":
        pytest.skip("kernels are shared on the CPU only (compilation.shares_kernels)")


def test_runtime_values_are_the_values_and_not_constants_of_the_program(monkeypatch):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gaml_jax import compilation

    _on_cpu_only()

    def offsets(w):
        return compilation.as_runtime_values((jnp.int32(3), jnp.int32(70000), jnp.uint32(2**32 - 1)), w)

    for witness in (np.float32(-2.5), np.full((2, 3), -1, np.int32), np.uint32(2**31 + 5)):
        out = jax.jit(offsets)(witness)
        assert [int(x) for x in out] == [3, 70000, 2**32 - 1]
        assert [x.dtype for x in out] == [jnp.int32, jnp.int32, jnp.uint32]
    # On the CPU the values leave a loop XLA cannot remove; switched off, they stay constants.
    assert "while(" in jax.jit(offsets).lower(np.float32(1)).compile().as_text()
    monkeypatch.setattr(compilation, "SHARE_KERNELS", False)
    assert not compilation.shares_kernels()
    # A new function, so that JAX traces again rather than reusing the trace of the first jit.
    compiled = jax.jit(lambda w: offsets(w)).lower(np.float32(1)).compile().as_text()
    assert "while(" not in compiled


def test_the_flat_optimizer_updates_same_shaped_tensors_with_one_kernel(monkeypatch):
    """The flat optimizer cuts its update vectors at offsets XLA sees only at run time: the
    updates of same-shaped tensors compile to one kernel, and the numbers are those of constant
    offsets, bit for bit."""
    import functools

    import jax
    import numpy as np
    import optax

    from gaml_jax import compilation
    from gaml_jax.train_step import make_optimizer

    _on_cpu_only()
    rng = np.random.default_rng(0)
    shapes = {"w": (16, 8), "b": (8,), "LayerNorm": {"scale": (8,)}}
    params = {
        f"layer_{i}": jax.tree.map(
            lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda s: isinstance(s, tuple)
        )
        for i in range(6)
    }
    params["classifier_0"] = {"kernel": rng.normal(size=(8, 2)).astype(np.float32)}
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    kd = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    tx = make_optimizer(
        method="gaml",
        total_steps=10,
        learning_rate=1e-2,
        exit_learning_rate=1e-1,
        warmup_steps=0,
        weight_decay=0.01,
    )

    def update(params, grads, kd):
        updates, _ = tx.update(grads, tx.init(params), params, kd_grads=kd)
        return optax.apply_updates(params, updates)

    results = {}
    for share in (False, True):
        monkeypatch.setattr(compilation, "SHARE_KERNELS", share)
        # A new partial each time: JAX traces anew rather than reusing the other form's trace.
        compiled = jax.jit(functools.partial(update)).lower(params, grads, kd).compile()
        results[share] = (compiled(params, grads, kd), _slicing_kernels(compiled))
    for a, b in zip(jax.tree.leaves(results[False][0]), jax.tree.leaves(results[True][0]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Constant offsets: a kernel per tensor (6 layers x 3). Run-time offsets: one per shape and
    # group (3), and at most one per group computing the loop's counter.
    assert results[False][1] >= 18 and results[True][1] <= 6, (results[False][1], results[True][1])


def test_the_train_step_with_shared_kernels_takes_the_same_steps(monkeypatch):
    """With dropout, the layers' keys and the optimizer's offsets as run-time values: the same
    parameters and metrics after two GAML steps, bit for bit, from fewer distinct kernels."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gaml_jax import compilation
    from gaml_jax.train_step import create_train_state, dropout_key, make_optimizer, train_step
    from tests.test_train_step import CONFIG, init_params, make_batch

    _on_cpu_only()
    config = CONFIG.replace(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model, params = init_params(config)
    tx = make_optimizer(
        method="gaml", total_steps=10, learning_rate=1e-3, exit_learning_rate=1e-2, warmup_steps=2
    )
    batch = {k: jnp.asarray(v) for k, v in make_batch(3, config).items()}
    results = {}
    for share in (False, True):
        monkeypatch.setattr(compilation, "SHARE_KERNELS", share)
        step = jax.jit(functools.partial(train_step, model=model, tx=tx))
        state = create_train_state(params, tx)
        compiled = step.lower(state, batch, dropout_key(3)).compile()
        for _ in range(2):
            state, metrics = compiled(state, batch, dropout_key(3))
        kernels = _fused(compiled)
        results[share] = (state, metrics, len(kernels), sum("xor(" in k for k in kernels))
    for a, b in zip(jax.tree.leaves(results[False][:2]), jax.tree.leaves(results[True][:2]), strict=True):
        np.testing.assert_array_equal(a, b)
    (_, _, before, hashing_before), (_, _, shared, hashing_shared) = results[False], results[True]
    assert shared < before, (before, shared)
    # The kernels that hash (threefry: xor) a site's key out of its layer's: one per layer before.
    assert hashing_shared < hashing_before, (hashing_before, hashing_shared)


# ---------------------------------------------------------------- programs compiled ahead


def test_programs_compiled_ahead_run_in_place_of_jit_and_compile_on_the_pool():
    """compile_ahead compiles each (function, arguments) once, on its worker threads, and the
    function then runs those programs for calls with the same key, with jit's results; a call with
    another key compiles through jit as usual; a compilation's error is raised by compile_ahead, or
    handed to its on_error while the other programs compile."""
    import threading

    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest

    from gaml_jax.compilation import CompiledAhead, compile_ahead

    compiles = []  # (program, thread) of each backend compilation

    def listen(event, secs, fun_name="", **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append((fun_name, threading.current_thread().name))

    def affine(w, batch):
        return jnp.tanh(batch["x"] @ w) * 2.0 + 1.0

    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    batches = [{"x": np.arange(n * 4, dtype=np.float32).reshape(n, 4) / 7} for n in (2, 5, 3)]
    fn = CompiledAhead(jax.jit(affine), key=lambda w, batch: batch["x"].shape)
    ready = []
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        # Repeated and already-compiled jobs are skipped: three programs for five jobs.
        compile_ahead(
            [(fn, (w, b)) for b in batches[:2] + batches[:2]], workers=2, progress=lambda: ready.append(1)
        )
        compile_ahead([(fn, (w, batches[0])), (fn, (w, batches[2]))], workers=2)
        assert sorted(fn.programs) == [(2, 4), (3, 4), (5, 4)] and len(ready) == 2
        ahead = [name for name, thread in compiles if thread.startswith("compile")]
        assert ahead == ["jit(affine)"] * 3 and len(compiles) == 3
        for b in batches:
            np.testing.assert_allclose(fn(w, b), np.tanh(b["x"] @ w) * 2 + 1, rtol=1e-6, atol=1e-6)
        assert len(compiles) == 3  # the calls ran the programs compiled ahead
        np.testing.assert_allclose(
            fn(w, {"x": np.ones((7, 4), np.float32)}), np.tanh(np.ones((7, 4)) @ w) * 2 + 1, rtol=1e-6
        )
        assert compiles[3:] == [("jit(affine)", threading.current_thread().name)]  # jit, in this thread
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    bad = CompiledAhead(jax.jit(affine, compiler_options={"xla_cpu_no_such_option": ""}), key=lambda w, b: 0)
    if jax.default_backend() == "cpu":
        with pytest.raises(Exception, match="No such compile option"):
            compile_ahead([(bad, (w, batches[0]))])
        assert not bad.programs
        # With on_error, the failure is handed over and the other programs are still compiled.
        good = CompiledAhead(jax.jit(affine), key=lambda w, b: 0)
        failed = []
        jobs = [(bad, (w, batches[0])), (good, (w, batches[0]))]
        compile_ahead(jobs, on_error=lambda f, e: failed.append((f, str(e))))
        assert [f for f, _ in failed] == [bad] and "No such compile option" in failed[0][1]
        assert not bad.programs and list(good.programs) == [0]
