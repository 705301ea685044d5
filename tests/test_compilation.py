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
