"""Early exit: the real runner against the full model's exits (criteria: tests/test_criteria.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaml_jax.config import ModelConfig
from gaml_jax.criteria import exit_counts, exit_decisions, find_threshold, speedup_layers
from gaml_jax.early_exit import EarlyExitRunner
from gaml_jax.model import MultiExitBert

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)
SEQ = 12


# ---------------------------------------------------------------------------- the real runner


def tiny_model(
    num_labels, exit_layers=None, seed=0, num_hidden_layers=3, shared_pooler=True, widths=None, **pooling
):
    cfg = ModelConfig(
        **{**TINY, "num_hidden_layers": num_hidden_layers, **(widths or {})},
        num_labels=num_labels,
        exit_layers=exit_layers,
        shared_pooler=shared_pooler,
        **pooling,
    )
    model = MultiExitBert(cfg)
    # Seeded numpy weights on the model's parameter shapes (compiling model.init costs seconds).
    # Classifiers are drawn large, so that exit confidence varies across examples, and around a
    # common kernel, so that exits often agree (as patience needs).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((cfg.hidden_size, num_labels)) * 3

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "classifier" in name and "kernel" in name:
            return jnp.asarray(common + rng.standard_normal(leaf.shape) * 2, jnp.float32)
        value = rng.standard_normal(leaf.shape) * 0.1 + (1.0 if name.endswith("['scale']") else 0.0)
        return jnp.asarray(value, jnp.float32)

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_batch(n, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, SEQ + 1, n)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": rng.integers(1, TINY["vocab_size"], (n, SEQ)).astype(np.int32) * mask,
        "attention_mask": mask,
        "token_type_ids": (rng.random((n, SEQ)) < 0.5).astype(np.int32) * mask,
    }


@pytest.fixture(scope="module")
def classifier():
    model, params = tiny_model(num_labels=3)
    return model, EarlyExitRunner(model, params, batch_buckets=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def mean_classifier():
    """Mean-pooled exits: the runner must carry each row's mask through compaction."""
    model, params = tiny_model(num_labels=3, seed=1, exit_pooling="mean")
    return model, EarlyExitRunner(model, params, batch_buckets=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def bfloat16_float32_stream():
    """bfloat16 compute, the residual stream in float32: the runner carries float32 hidden states
    between its per-layer programs, through compaction."""
    model, params = tiny_model(num_labels=3, seed=1, exit_pooling="mean")
    model = MultiExitBert(model.config.replace(dtype="bfloat16", float32_residual=True))
    return model, EarlyExitRunner(model, params, batch_buckets=(1, 2, 4, 8))


@pytest.fixture(scope="module")
def bfloat16_wide():
    """bfloat16 compute at widths 64 and 128: on a CPU where XLA multiplies bfloat16 natively, every
    Dense but the classifiers takes model._dense_dot_bf16 (float32 outputs), in the runner's
    per-layer programs as in the whole model's."""
    model, params = tiny_model(num_labels=3, seed=2, widths={"hidden_size": 64, "intermediate_size": 128})
    model = MultiExitBert(model.config.replace(dtype="bfloat16"))
    return model, EarlyExitRunner(model, params, batch_buckets=(1, 2, 4, 8))


@pytest.mark.parametrize("criterion,target", [("entropy", 1.4), ("confidence", 1.4), ("patience", 1.1)])
@pytest.mark.parametrize(
    "runner_fixture", ["classifier", "mean_classifier", "bfloat16_float32_stream", "bfloat16_wide"]
)
def test_runner_matches_full_model_at_each_exit(request, runner_fixture, criterion, target):
    model, runner = request.getfixturevalue(runner_fixture)
    cfg = model.config
    wide = np.asarray(runner.full_forward(tiny_batch(64, seed=100)))
    threshold = find_threshold(wide, criterion, target, cfg.num_hidden_layers, cfg.exits)
    exit_index = []
    for n in (1, 6, 11):  # 6: not a bucket; 11: above the largest bucket
        batch = tiny_batch(n, seed=n)
        full = np.asarray(runner.full_forward(batch))  # [exits, batch, labels]
        result = runner.run(batch, criterion, threshold)
        # The runner decides exactly as the simulation on the full model's logits.
        np.testing.assert_array_equal(result.exit_index, exit_decisions(full, criterion, threshold))
        at_exit = full[result.exit_index, np.arange(n)]
        np.testing.assert_allclose(result.logits, at_exit, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(result.logits.argmax(-1), at_exit.argmax(-1))
        np.testing.assert_array_equal(result.layers_run, np.array(cfg.exits)[result.exit_index])
        exit_index.append(result.exit_index)
    # Examples left early and at the deepest exit, so compaction was exercised.
    taken = set(np.concatenate(exit_index).tolist())
    assert cfg.num_exits - 1 in taken and len(taken) >= 2, taken


def test_compaction_with_numpy_on_the_cpu_takes_the_device_gathers_results(mean_classifier):
    """On the CPU the runner gathers the running rows (hidden state and mask) with numpy: the same
    exits and logits, bit for bit, as the device's gather, and no gather program compiled."""
    model, runner = mean_classifier
    if jax.default_backend() != "cpu":
        pytest.skip("the runner compacts with numpy on the CPU only")
    assert runner.compacts_on_host
    device = EarlyExitRunner(model, runner.params, batch_buckets=(1, 2, 4, 8))
    device.compacts_on_host = False
    wide = np.asarray(runner.full_forward(tiny_batch(64, seed=100)))
    threshold = find_threshold(wide, "entropy", 1.4, model.config.num_hidden_layers, model.config.exits)
    host = EarlyExitRunner(model, runner.params, batch_buckets=(1, 2, 4, 8))
    taken = []
    for n in (8, 7, 3):
        batch = tiny_batch(n, seed=40 + n)
        got, want = host.run(batch, "entropy", threshold), device.run(batch, "entropy", threshold)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        taken += got.exit_index.tolist()
    assert len(set(taken)) == model.config.num_exits  # examples left at every exit
    # The device's runner compiled gathers into smaller buckets; the host's none.
    assert device._compact._cache_size() >= 2 and host._compact._cache_size() == 0


def test_runner_exits_fire_and_never_exit(classifier):
    model, runner = classifier
    cfg = model.config
    batch = tiny_batch(16, seed=7)
    early = runner.run(batch, "confidence", 0.0)  # every example is confident enough at exit 0
    np.testing.assert_array_equal(early.exit_index, np.zeros(16))
    np.testing.assert_array_equal(early.layers_run, np.ones(16))
    for criterion, never in [("entropy", 0.0), ("confidence", 1.0), ("patience", cfg.num_exits)]:
        result = runner.run(batch, criterion, never)
        np.testing.assert_array_equal(result.exit_index, np.full(16, cfg.num_exits - 1))
        assert speedup_layers(result.layers_run, cfg.num_hidden_layers) == 1.0
        np.testing.assert_array_equal(exit_counts(result.exit_index, cfg.num_exits), [0, 0, 16])


def test_runner_regression_patience_with_sparse_exits():
    # A layer without an exit, and one pooler per exit (DeeBERT style).
    model, params = tiny_model(1, exit_layers=(1, 3, 4), seed=1, num_hidden_layers=4, shared_pooler=False)
    runner = EarlyExitRunner(model, params, batch_buckets=(1, 4))
    _check_regression_patience(model, runner)


def test_runner_mean_pooling_without_pooler_dense():
    model, params = tiny_model(
        1, exit_layers=(1, 3, 4), seed=1, num_hidden_layers=4, exit_pooling="mean", exit_pooler_dense=False
    )
    assert not any(name.startswith("pooler") for name in params)
    _check_regression_patience(model, EarlyExitRunner(model, params, batch_buckets=(1, 4)))


def _check_regression_patience(model, runner):
    batch = tiny_batch(7, seed=3)
    full = np.asarray(runner.full_forward(batch))  # [3, 7, 1]
    deltas = np.abs(full[1, :, 0] - full[0, :, 0])
    # Some examples count as unchanged at exit 1, some not. The tolerance sits midway between two
    # deltas, never on one: the runner's layer-by-layer logits differ from the fused pass by float
    # rounding, which would flip an example whose delta equals the tolerance.
    ordered = np.sort(deltas)
    gaps = np.diff(ordered)[1:-1]  # keep at least two examples on each side
    k = int(np.argmax(gaps)) + 1
    tolerance = float(ordered[k] + ordered[k + 1]) / 2
    assert gaps.max() > 1e-3, ordered
    result = runner.run(batch, "patience", 1, tolerance=tolerance)
    np.testing.assert_array_equal(result.exit_index, np.where(deltas < tolerance, 1, 2))
    np.testing.assert_array_equal(result.layers_run, np.where(deltas < tolerance, 3, 4))
    at_exit = full[result.exit_index, np.arange(7)]
    np.testing.assert_allclose(result.logits, at_exit, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="patience"):
        runner.run(batch, "entropy", 0.5)


@pytest.mark.parametrize(
    "num_labels,criterion,target,exit_layers",
    [
        (3, "entropy", 1.4, (1, 3, 4)),
        (3, "confidence", 1.6, (1, 3, 4)),
        (3, "patience", None, (1, 3, 4)),
        (1, "patience", None, (1, 3, 4)),
        (3, "entropy", 2.0, (1, 2, 3)),  # the last exit before the last layer
    ],
)
def test_one_program_at_batch_one_equals_layer_by_layer(num_labels, criterion, target, exit_layers):
    """A lone example runs as one device program (the exported loop); it takes the exit, the
    logits and the layers of the layer-by-layer path, on a model with a layer without an exit
    and one pooler per exit. Both compute the last exit's layer for its [CLS] row only."""
    model, params = tiny_model(
        num_labels, exit_layers=exit_layers, seed=2, num_hidden_layers=4, shared_pooler=False
    )
    assert model.cls_only_layer() == exit_layers[-1]
    runner = EarlyExitRunner(model, params, batch_buckets=(1, 4))
    assert runner.one_program_at_batch_one
    cfg = model.config
    wide = np.asarray(runner.full_forward(tiny_batch(64, seed=200)))
    threshold = 1 if criterion == "patience" else find_threshold(wide, criterion, target, 4, cfg.exits)
    # Regression patience: a tolerance that about half the examples' first change falls within.
    tolerance = float(np.median(np.abs(wide[1] - wide[0]))) if num_labels == 1 else 0.1
    taken = []
    for seed in range(24):
        example = tiny_batch(1, seed=300 + seed)
        fused = runner.run(example, criterion, threshold, tolerance=tolerance)
        stepwise = runner.run(example, criterion, threshold, tolerance=tolerance, one_program=False)
        np.testing.assert_array_equal(fused.exit_index, stepwise.exit_index)
        np.testing.assert_array_equal(fused.layers_run, stepwise.layers_run)
        np.testing.assert_allclose(fused.logits, stepwise.logits, atol=1e-5, rtol=1e-5)
        taken.append(int(fused.exit_index[0]))
    assert len(set(taken)) >= 2, taken  # examples left at different exits
    assert len(runner._programs) == 1  # one compiled program per criterion, reused
