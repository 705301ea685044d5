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
