"""Gradient alignment (GA): GAML-BERT's fix for the conflict between CE and distillation.

The CE gradient ``g_ce`` and the mutual-learning (KD) gradient ``g_kd`` of a multi-exit model
often point in conflicting directions (negative inner product). GA removes from ``g_kd`` its
component along ``g_ce`` when they conflict, so that distillation never undoes the CE step:

    g_kd <- g_kd - (<g_kd, g_ce> / ||g_ce||^2) g_ce     if <g_kd, g_ce> < 0
    update = g_ce + kd_weight * g_kd

It is written as an optax transform taking ``kd_grads`` as an extra argument, so it goes first
in an ordinary optax chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


class GradientAlignmentState(NamedTuple):
    """Diagnostics of the last step, for logging.

    Attributes:
      cosine: cosine between the whole-model ``g_ce`` and ``g_kd`` (float32 scalar).
      projected: 1.0 if ``g_kd`` conflicted with ``g_ce`` (and so, with ``align=True``, was
        projected), else 0.0; with ``per_tensor=True``, the fraction of tensors that conflicted.
    """

    cosine: Array
    projected: Array


def _accumulation_dtype(x: Array) -> jnp.dtype:
    # float32 at least, so that bfloat16 gradients do not lose the inner products.
    return jnp.promote_types(x.dtype, jnp.float32)


def _vdot(x: Array, y: Array) -> Array:
    dtype = _accumulation_dtype(x)
    return jnp.sum(x.astype(dtype) * y.astype(dtype))


def _conflicts(kd_dot_ce: Array, ce_sq_norm: Array) -> Array:
    # A zero CE gradient has <g_kd, g_ce> = 0: it never conflicts, there is nothing to project.
    return (kd_dot_ce < 0) & (ce_sq_norm > 0)


def _projection_coefficient(kd_dot_ce: Array, ce_sq_norm: Array) -> Array:
    """<g_kd, g_ce> / ||g_ce||^2 where the two conflict, else 0."""
    conflict = _conflicts(kd_dot_ce, ce_sq_norm)
    # The inner `where` keeps the discarded branch finite (no NaN from 0 / 0).
    return jnp.where(conflict, kd_dot_ce / jnp.where(conflict, ce_sq_norm, 1.0), 0.0)


def gradient_alignment(
    kd_weight: float,
    *,
    per_tensor: bool = False,
    align: bool = True,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Combines CE and KD gradients, first removing the KD component that conflicts with CE.

    ``updates`` are the CE gradients and the extra argument ``kd_grads`` the mutual-learning
    gradients (same tree). Where ``<g_kd, g_ce> < 0``, ``g_kd`` loses its projection on
    ``g_ce`` (afterwards ``<g_kd, g_ce> = 0``); otherwise it is kept. The output is
    ``g_ce + kd_weight * g_kd`` in the dtypes of ``updates``; inner products and the
    combination are computed in (at least) float32. A zero CE gradient projects nothing.

    Args:
      kd_weight: weight ``lambda`` of the mutual-learning gradient.
      per_tensor: if True, align each leaf on its own; by default the inner product is over
        the whole model (all leaves as one vector), as in the paper.
      align: if False, plain mutual learning ``g_ce + kd_weight * g_kd`` (no projection),
        with the same diagnostics: ``projected`` then reports the conflicts GA would fix.
      eps: floor on ``||g_ce|| * ||g_kd||`` in the reported cosine, so that a zero gradient
        reports a cosine of 0 rather than NaN.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``kd_grads=`` and
      whose state is a ``GradientAlignmentState``. Put it first in a chain: the transforms
      after it (clipping, the optimizer) see the aligned gradient.

    References:
      Wei Zhu, Xiaoling Wang, Yuan Ni, Guotong Xie, "GAML-BERT: Improving BERT Early Exiting
      by Gradient Aligned Mutual Learning", EMNLP 2021, pp. 3033-3044.
      https://aclanthology.org/2021.emnlp-main.242

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gaml_jax.alignment import gradient_alignment
      >>> params = {"w": jnp.zeros(2)}
      >>> tx = optax.chain(gradient_alignment(1.0), optax.sgd(1.0))
      >>> opt_state = tx.init(params)
      >>> ce_grads = {"w": jnp.array([1.0, 0.0])}
      >>> kd_grads = {"w": jnp.array([-1.0, 1.0])}  # conflicts: loses its [-1, 0] part
      >>> updates, opt_state = tx.update(ce_grads, opt_state, params, kd_grads=kd_grads)
      >>> updates["w"]
      Array([-1., -1.], dtype=float32)
    """

    def init_fn(params: optax.Params) -> GradientAlignmentState:
        del params
        return GradientAlignmentState(cosine=jnp.zeros([], jnp.float32), projected=jnp.zeros([], jnp.float32))

    def update_fn(
        updates: optax.Updates,
        state: GradientAlignmentState,
        params: optax.Params | None = None,
        *,
        kd_grads: optax.Updates,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GradientAlignmentState]:
        del state, params, extra_args
        ce_grads = updates
        kd_dot_ce = jax.tree.map(_vdot, kd_grads, ce_grads)  # per leaf
        ce_sq_norm = jax.tree.map(lambda g: _vdot(g, g), ce_grads)
        kd_sq_norm = jax.tree.map(lambda g: _vdot(g, g), kd_grads)

        total_dot = optax.tree_utils.tree_sum(kd_dot_ce)
        total_ce_sq = optax.tree_utils.tree_sum(ce_sq_norm)
        total_kd_sq = optax.tree_utils.tree_sum(kd_sq_norm)
        cosine = total_dot / jnp.maximum(jnp.sqrt(total_ce_sq) * jnp.sqrt(total_kd_sq), eps)

        if per_tensor:
            coefficients = jax.tree.map(_projection_coefficient, kd_dot_ce, ce_sq_norm)
            conflicts = jax.tree.leaves(jax.tree.map(_conflicts, kd_dot_ce, ce_sq_norm))
            projected = jnp.mean(jnp.stack(conflicts).astype(jnp.float32)) if conflicts else jnp.zeros([])
        else:
            coefficient = _projection_coefficient(total_dot, total_ce_sq)
            coefficients = jax.tree.map(lambda _: coefficient, ce_grads)
            projected = _conflicts(total_dot, total_ce_sq)
        if not align:
            coefficients = jax.tree.map(jnp.zeros_like, coefficients)

        def combine(g_ce: Array, g_kd: Array, coefficient: Array) -> Array:
            dtype = _accumulation_dtype(g_ce)
            g_ce32, g_kd32 = g_ce.astype(dtype), g_kd.astype(dtype)
            aligned_kd = g_kd32 - coefficient.astype(dtype) * g_ce32
            return (g_ce32 + kd_weight * aligned_kd).astype(g_ce.dtype)

        aligned = jax.tree.map(combine, ce_grads, kd_grads, coefficients)
        new_state = GradientAlignmentState(
            cosine=cosine.astype(jnp.float32), projected=jnp.asarray(projected, jnp.float32)
        )
        return aligned, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alignment_diagnostics(opt_state: Any) -> dict[str, Array]:
    """Finds the (single) ``GradientAlignmentState`` in an optimizer state, e.g. a chain's.

    Returns:
      ``{"grad_cosine": ..., "projected": ...}`` as device scalars (no host sync).
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, GradientAlignmentState.__name__)
    if len(found) != 1:
        raise ValueError(f"Expected one GradientAlignmentState in the optimizer state, found {len(found)}")
    state = found[0][1]
    return {"grad_cosine": state.cosine, "projected": state.projected}
