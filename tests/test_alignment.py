"""gaml_jax.alignment against a numpy projection (float64), alone, under jit and in an optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gaml_jax.alignment import GradientAlignmentState, alignment_diagnostics, gradient_alignment

KD_WEIGHT = 0.7
RTOL, ATOL = 1e-5, 1e-6
SHAPES = {"dense": {"kernel": (5, 3), "bias": (3,)}, "scale": (4,)}


def _tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda shape: (scale * rng.normal(size=shape)).astype(np.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _np_dot(x: dict, y: dict) -> float:
    return sum(
        np.vdot(a.astype(np.float64), b.astype(np.float64))
        for a, b in zip(_leaves(x), _leaves(y), strict=True)
    )


def _leaves(tree: dict) -> list[np.ndarray]:
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def _np_cosine(ce: dict, kd: dict) -> float:
    return _np_dot(kd, ce) / np.sqrt(_np_dot(ce, ce) * _np_dot(kd, kd))


def _np_gradient_alignment(
    ce: dict, kd: dict, per_tensor: bool = False, align: bool = True
) -> list[np.ndarray]:
    """g_ce + lambda * g_kd, g_kd first losing its projection on g_ce where <g_kd, g_ce> < 0."""
    ce_leaves, kd_leaves = _leaves(ce), _leaves(kd)
    groups = [[k] for k in range(len(ce_leaves))] if per_tensor else [list(range(len(ce_leaves)))]
    out = [None] * len(ce_leaves)
    for group in groups:
        dot = sum(np.vdot(kd_leaves[k], ce_leaves[k]) for k in group)
        sq_norm = sum(np.vdot(ce_leaves[k], ce_leaves[k]) for k in group)
        coefficient = dot / sq_norm if align and dot < 0 and sq_norm > 0 else 0.0
        for k in group:
            out[k] = ce_leaves[k] + KD_WEIGHT * (kd_leaves[k] - coefficient * ce_leaves[k])
    return out


def _assert_leaves_close(tree: dict, expected: list[np.ndarray], rtol=RTOL, atol=ATOL):
    for leaf, want in zip(jax.tree.leaves(tree), expected, strict=True):
        np.testing.assert_allclose(np.asarray(leaf, np.float64), want, rtol=rtol, atol=atol)


def _pair(conflicting: bool) -> tuple[dict, dict]:
    """CE and KD gradients whose whole-model inner product is negative (or positive)."""
    ce, noise = _tree(0), _tree(1)
    sign = -1.5 if conflicting else 1.5
    kd = jax.tree.map(lambda n, c: n + sign * c, noise, ce)
    assert (_np_dot(kd, ce) < 0) == conflicting
    return ce, kd


def _apply(tx: optax.GradientTransformationExtraArgs, ce: dict, kd: dict):
    return tx.update(ce, tx.init(ce), kd_grads=kd)


def test_conflicting_pair_is_projected_orthogonal_to_ce():
    ce, kd = _pair(conflicting=True)
    aligned, state = _apply(gradient_alignment(KD_WEIGHT), ce, kd)

    _assert_leaves_close(aligned, _np_gradient_alignment(ce, kd))
    kd_part = jax.tree.map(lambda a, c: (a - c) / KD_WEIGHT, aligned, ce)
    assert abs(_np_dot(kd_part, ce)) < 1e-5 * np.sqrt(_np_dot(ce, ce) * _np_dot(kd, kd))
    assert float(state.projected) == 1.0
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)
    assert float(state.cosine) < 0


def test_non_conflicting_pair_passes_untouched():
    ce, kd = _pair(conflicting=False)
    aligned, state = _apply(gradient_alignment(KD_WEIGHT), ce, kd)

    _assert_leaves_close(aligned, [c + KD_WEIGHT * k for c, k in zip(_leaves(ce), _leaves(kd), strict=True)])
    assert float(state.projected) == 0.0
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)


def test_per_tensor_projects_only_the_conflicting_leaf():
    ce = _tree(0)
    noise = _tree(1)
    # kernel conflicts, bias and scale do not; the whole model does not conflict.
    kd = {
        "dense": {
            "kernel": noise["dense"]["kernel"] - 1.5 * ce["dense"]["kernel"],
            "bias": noise["dense"]["bias"] + 3.0 * ce["dense"]["bias"],
        },
        "scale": noise["scale"] + 20.0 * ce["scale"],
    }
    assert _np_dot(kd["dense"]["kernel"], ce["dense"]["kernel"]) < 0 < _np_dot(kd, ce)
    assert _np_dot(kd["dense"]["bias"], ce["dense"]["bias"]) > 0 and _np_dot(kd["scale"], ce["scale"]) > 0

    aligned, state = _apply(gradient_alignment(KD_WEIGHT, per_tensor=True), ce, kd)

    expected = _np_gradient_alignment(ce, kd, per_tensor=True)
    _assert_leaves_close(aligned, expected)
    kernel_kd = (np.asarray(aligned["dense"]["kernel"]) - ce["dense"]["kernel"]) / KD_WEIGHT
    assert abs(np.vdot(kernel_kd, ce["dense"]["kernel"])) < 1e-4
    np.testing.assert_allclose(aligned["scale"], ce["scale"] + KD_WEIGHT * kd["scale"], rtol=RTOL)
    np.testing.assert_allclose(state.projected, 1 / 3, rtol=1e-6)  # one leaf of three
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)  # still whole-model
    # The whole-model transform would have left this pair alone.
    whole_model, _ = _apply(gradient_alignment(KD_WEIGHT), ce, kd)
    _assert_leaves_close(whole_model, _np_gradient_alignment(ce, kd))
    assert not np.allclose(whole_model["dense"]["kernel"], aligned["dense"]["kernel"])


def test_align_false_is_plain_mutual_learning_with_diagnostics():
    ce, kd = _pair(conflicting=True)
    aligned, state = _apply(gradient_alignment(KD_WEIGHT, align=False), ce, kd)

    _assert_leaves_close(aligned, [c + KD_WEIGHT * k for c, k in zip(_leaves(ce), _leaves(kd), strict=True)])
    assert float(state.projected) == 1.0  # the conflict GA would have fixed
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_zero_ce_gradient_gives_no_nan(per_tensor):
    ce = jax.tree.map(np.zeros_like, _tree(0))
    kd = _tree(1)
    aligned, state = jax.jit(_apply, static_argnums=0)(
        gradient_alignment(KD_WEIGHT, per_tensor=per_tensor), ce, kd
    )

    _assert_leaves_close(aligned, [KD_WEIGHT * k for k in _leaves(kd)])
    assert float(state.cosine) == 0.0 and float(state.projected) == 0.0


def test_per_tensor_zero_ce_leaf_next_to_a_conflicting_one():
    ce, kd = _pair(conflicting=True)
    ce["dense"]["bias"] = np.zeros_like(ce["dense"]["bias"])
    aligned, state = _apply(gradient_alignment(KD_WEIGHT, per_tensor=True), ce, kd)
    expected = _np_gradient_alignment(ce, kd, per_tensor=True)
    _assert_leaves_close(aligned, expected)
    assert np.all(np.isfinite(state.cosine)) and np.all(np.isfinite(state.projected))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_init_and_update_under_jit(per_tensor):
    ce, kd = _pair(conflicting=True)
    tx = gradient_alignment(KD_WEIGHT, per_tensor=per_tensor)
    state = jax.jit(tx.init)(ce)
    assert isinstance(state, GradientAlignmentState)
    aligned, state = jax.jit(tx.update)(ce, state, None, kd_grads=kd)

    _assert_leaves_close(aligned, _np_gradient_alignment(ce, kd, per_tensor=per_tensor))
    assert jax.tree.structure(aligned) == jax.tree.structure(ce)
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)


def test_first_in_a_chain_with_clipping_and_adamw():
    """One jitted chained step equals the same chain without GA fed the numpy-aligned gradient."""
    params = _tree(5)
    ce, kd = _pair(conflicting=True)
    assert np.sqrt(_np_dot(ce, ce)) > 1.0  # so that the clipping acts

    def optimizer(*first):
        return optax.chain(*first, optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))

    tx = optimizer(gradient_alignment(KD_WEIGHT))
    opt_state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):  # the second step sees Adam moments built from aligned gradients
        updates, opt_state = step(ce, opt_state, params, kd_grads=kd)

    reference = optimizer()
    np_aligned = jax.tree.unflatten(
        jax.tree.structure(ce), [a.astype(np.float32) for a in _np_gradient_alignment(ce, kd)]
    )
    reference_state = reference.init(params)
    for _ in range(2):
        expected, reference_state = reference.update(np_aligned, reference_state, params)

    _assert_leaves_close(updates, _leaves(expected), rtol=1e-5, atol=1e-7)
    diagnostics = alignment_diagnostics(opt_state)
    np.testing.assert_allclose(diagnostics["grad_cosine"], _np_cosine(ce, kd), rtol=RTOL)
    assert float(diagnostics["projected"]) == 1.0


def test_alignment_diagnostics_needs_exactly_one_state():
    with pytest.raises(ValueError, match="found 0"):
        alignment_diagnostics(optax.adamw(1e-3).init(_tree(0)))
    twice = optax.chain(gradient_alignment(1.0), gradient_alignment(1.0))
    with pytest.raises(ValueError, match="found 2"):
        alignment_diagnostics(twice.init(_tree(0)))


def test_bfloat16_leaves_keep_their_dtype():
    ce, kd = _pair(conflicting=True)
    ce["scale"] = ce["scale"].astype(jnp.bfloat16)
    kd["scale"] = kd["scale"].astype(jnp.bfloat16)
    ce["dense"]["kernel"] = ce["dense"]["kernel"].astype(jnp.bfloat16)
    aligned, state = jax.jit(_apply, static_argnums=0)(gradient_alignment(KD_WEIGHT), ce, kd)

    assert jax.tree.map(lambda x: x.dtype, aligned) == jax.tree.map(lambda x: x.dtype, ce)
    assert state.cosine.dtype == jnp.float32
    # The numpy reference sees the same (bfloat16-rounded) inputs; only the output is rounded.
    _assert_leaves_close(aligned, _np_gradient_alignment(ce, kd), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(state.cosine, _np_cosine(ce, kd), rtol=RTOL)
