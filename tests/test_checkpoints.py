"""Checkpoints: the step best.json names is always on disk (ties, NaN scores, restarts), the last
``keep`` are kept besides it, and load_trained reads the one it names."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaml_jax.checkpoints import (
    BEST_FILE,
    MODEL_CONFIG_FILE,
    Checkpointer,
    load_trained,
    write_json_atomic,
)
from gaml_jax.config import ModelConfig
from gaml_jax.model import MultiExitBert

CONFIG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
    num_labels=2,
)


def _params(step: int):
    """Parameters that tell which step saved them: the init shifted by the step number."""
    params = MultiExitBert(CONFIG).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return jax.tree.map(lambda x: x + step, params)


def _save_run(workdir, scores, keep):
    """Saves one checkpoint per score (steps 1, 2, ...) as the trainer does at each epoch's end."""
    write_json_atomic(workdir / MODEL_CONFIG_FILE, dataclasses.asdict(CONFIG))
    ckpt = Checkpointer(workdir, keep=keep)
    try:
        for step, score in enumerate(scores, start=1):
            params = _params(step)
            ckpt.save(step, params, {"count": jnp.asarray(step)}, score=score)
        return ckpt.manager.all_steps()
    finally:
        ckpt.close()


def _best_json(workdir):
    path = workdir / BEST_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _assert_loads_step(workdir, which, step):
    _, params, loaded = load_trained(workdir, which=which)
    assert loaded == step
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_params(step)), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_tied_best_scores_keep_the_checkpoint_best_json_names(tmp_path):
    steps = _save_run(tmp_path, [0.80, 0.80, 0.75, 0.70], keep=2)
    # The earlier of equal scores is the best; it stays beside the last two.
    assert _best_json(tmp_path) == {"step": 1, "score": 0.80}
    assert steps == [1, 3, 4]
    _assert_loads_step(tmp_path, "best", 1)
    _assert_loads_step(tmp_path, "latest", 4)


def test_an_improving_run_deletes_the_old_best(tmp_path):
    steps = _save_run(tmp_path, [0.5, 0.9, 0.6, 0.7, 0.8], keep=2)
    assert _best_json(tmp_path) == {"step": 2, "score": 0.9}
    assert steps == [2, 4, 5]
    steps = _save_run(tmp_path / "b", [0.5, 0.6, 0.7, 0.8], keep=1)
    assert _best_json(tmp_path / "b") == {"step": 4, "score": 0.8}
    assert steps == [4]


def test_nan_scores_never_become_the_best(tmp_path):
    steps = _save_run(tmp_path, [float("nan"), 0.6, float("nan"), 0.5], keep=1)
    assert _best_json(tmp_path) == {"step": 2, "score": 0.6}
    assert steps == [2, 4]
    _assert_loads_step(tmp_path, "best", 2)
    # Only NaN scores: no best.json, and "best" falls back to the latest checkpoint.
    steps = _save_run(tmp_path / "nan", [float("nan"), float("nan")], keep=1)
    assert _best_json(tmp_path / "nan") is None
    assert steps == [2]
    _assert_loads_step(tmp_path / "nan", "best", 2)


def test_a_restarted_run_keeps_the_best_of_its_first_part(tmp_path):
    _save_run(tmp_path, [0.9, 0.5], keep=1)
    ckpt = Checkpointer(tmp_path, keep=1)  # a resumed run: a new Checkpointer on the same workdir
    try:
        for step, score in ((3, 0.6), (4, None), (5, 0.9)):  # None: a checkpoint between epochs
            ckpt.save(step, _params(step), {"count": jnp.asarray(step)}, score=score)
        assert ckpt.manager.all_steps() == [1, 5]
    finally:
        ckpt.close()
    assert _best_json(tmp_path) == {"step": 1, "score": 0.9}
    _assert_loads_step(tmp_path, "best", 1)


def test_a_best_json_naming_a_deleted_step_says_what_to_do(tmp_path):
    _save_run(tmp_path, [0.5, 0.6], keep=1)
    write_json_atomic(tmp_path / BEST_FILE, {"step": 1, "score": 0.9})  # as older versions left it
    with pytest.raises(FileNotFoundError, match=r"names step 1, which is not in .*--checkpoint latest"):
        load_trained(tmp_path, which="best")


def test_an_optimizer_state_of_another_layout_is_refused_in_one_line(tmp_path):
    """A run saved with the per-tensor optimizer state (before it went flat) cannot resume into the
    flat one: restore says so (LayoutError), and evaluation, which reads the parameters only, still works."""
    from gaml_jax.checkpoints import LayoutError
    from gaml_jax.train_step import make_optimizer

    params = _params(1)
    kw = dict(method="gaml", total_steps=10, learning_rate=1e-3, exit_learning_rate=1e-3, warmup_steps=1)
    per_tensor, flat = make_optimizer(per_tensor_alignment=True, **kw), make_optimizer(**kw)
    ckpt = Checkpointer(tmp_path)
    try:
        ckpt.save(1, params, per_tensor.init(params))
        with pytest.raises(LayoutError, match="at step 1 .* optimizer state structured otherwise"):
            ckpt.restore(1, params, flat.init(params))
        got, _ = ckpt.restore(1, params)
        np.testing.assert_array_equal(jax.tree.leaves(got)[0], jax.tree.leaves(params)[0])
    finally:
        ckpt.close()


def test_the_flat_optimizer_state_with_tensors_of_their_own_restores_as_saved(tmp_path):
    """The flat optimizer's groups of one large tensor are named after its path (dots and slashes
    in a dict key): their moments come back from disk bit for bit, each with its own tensor's size."""
    from gaml_jax.train_step import make_optimizer

    params = _params(1)
    kw = dict(method="gaml", total_steps=10, learning_rate=1e-3, exit_learning_rate=1e-3, warmup_steps=1)
    tx = make_optimizer(own_group_size=300, **kw)  # the word embeddings and FFN kernels: 384 each
    grads = jax.tree.map(lambda x: jnp.sin(3.0 * x), params)
    _, opt_state = jax.jit(tx.update)(grads, tx.init(params), params, kd_grads=grads)
    ckpt = Checkpointer(tmp_path)
    try:
        ckpt.save(1, params, opt_state)
        _, got = ckpt.restore(1, params, tx.init(params))
    finally:
        ckpt.close()
    own = [key for key in opt_state[2].inner_states["encoder"].inner_state[0].mu if key.count("/") > 1]
    assert len(own) >= 3, own
    assert jax.tree.structure(got) == jax.tree.structure(opt_state)
    for want, have in zip(jax.tree.leaves(opt_state), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))
