"""The GAML train step: one pure function ``(state, batch, rng) -> (state, metrics)``.

CE and KD gradients are taken separately (``jax.grad`` on each loss, or one ``jax.vjp`` over
the shared forward and two pull-backs: same numbers, ~20% cheaper) and handed to the optax
chain, whose first link (``gradient_alignment``) projects the KD gradient off the CE one.

The only sign of parallelism inside the step is ``lax.psum`` over ``axis_name``: the losses
are normalised by the GLOBAL number of examples, so the summed per-device gradients are
exactly the gradients of the whole batch, and the projection sees the global gradients.
Parallelism is applied once, at the call site: :func:`shard_map_step` (a device mesh, the
form JAX recommends) or :func:`pmap_step` (the design card's ``jax.pmap``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gaml_jax.alignment import alignment_diagnostics, gradient_alignment
from gaml_jax.losses import ce_loss, exit_weights, mutual_learning_loss, per_exit_ce
from gaml_jax.model import MultiExitBert

PyTree = Any
Batch = dict[str, jax.Array]

METHODS = ("ce", "ml", "gaml")  # plain multi-exit CE, mutual learning without GA, GAML
GRAD_MODES = ("vjp", "grad")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: PyTree
    opt_state: optax.OptState


def _is_exit_classifier(path: tuple) -> bool:
    return str(getattr(path[0], "key", path[0])).startswith("classifier_")


def _decays(path: tuple, leaf: jax.Array) -> bool:
    """No weight decay on biases and LayerNorm parameters (BERT's convention)."""
    names = [str(getattr(p, "key", p)) for p in path]
    return not (names[-1] == "bias" or any("LayerNorm" in n for n in names))


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak``, then linear decay to 0 at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
            optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1)),
        ],
        [warmup_steps],
    )


def make_optimizer(
    *,
    method: str,
    total_steps: int,
    learning_rate: float,
    exit_learning_rate: float,
    warmup_steps: int,
    weight_decay: float = 0.0,
    grad_clip_norm: float = 1.0,
    kd_weight: float = 1.0,
    per_tensor_alignment: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """GA (for ``ml``/``gaml``), global-norm clipping, then AdamW with its own rate for the exits.

    ``method="ce"`` has no GA link: the step then computes no KD gradient at all.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown training method {method!r}; choose one of {METHODS}.")

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate_schedule(peak, warmup_steps, total_steps),
            weight_decay=weight_decay,
            mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params),
        )

    def labels(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "exits" if _is_exit_classifier(path) else "encoder", params
        )

    links = []
    if method != "ce":
        links.append(gradient_alignment(kd_weight, per_tensor=per_tensor_alignment, align=method == "gaml"))
    if grad_clip_norm and grad_clip_norm > 0:
        links.append(optax.clip_by_global_norm(grad_clip_norm))
    links.append(
        optax.multi_transform({"encoder": adamw(learning_rate), "exits": adamw(exit_learning_rate)}, labels)
    )
    return optax.chain(*links)


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: MultiExitBert,
    tx: optax.GradientTransformationExtraArgs,
    method: str = "gaml",
    temperature: float = 1.0,
    exit_weighting: str = "layer",
    grad_mode: str = "vjp",
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GAML update on ``batch`` (this device's shard when ``axis_name`` is set).

    ``rng`` is the run's base key: the step's key is derived from it and the step number (and
    the device index), never carried, so a resumed run replays exactly.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"Unknown grad_mode {grad_mode!r}; choose one of {GRAD_MODES}.")
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    weights = batch["weights"]
    count = weights.sum()
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    normalizer = jnp.maximum(count, 1.0)
    exit_w = jnp.asarray(exit_weights(model.config.exits, exit_weighting))

    def forward(params: PyTree) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        exit_logits = model.apply(
            {"params": params},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            deterministic=False,
            rngs={"dropout": rng},
        ).logits  # [exits, batch, labels]
        ce = ce_loss(exit_logits, batch["labels"], weights, exit_w, normalizer)
        kd = mutual_learning_loss(exit_logits, weights, temperature, normalizer) if method != "ce" else 0.0
        return (ce, jnp.asarray(kd, jnp.float32)), exit_logits

    if method == "ce":
        (ce_grads, exit_logits), (ce, kd) = _grad_ce_only(forward, state.params)
        kd_grads = None
    elif grad_mode == "vjp":
        (ce, kd), pull_back, exit_logits = jax.vjp(forward, state.params, has_aux=True)
        one, zero = jnp.ones_like(ce), jnp.zeros_like(ce)  # same type as the loss (varying under shard_map)
        (ce_grads,) = pull_back((one, zero))
        (kd_grads,) = pull_back((zero, one))
    else:  # Two independent jax.grad calls, as the design card writes it.
        (ce, exit_logits), ce_grads = jax.value_and_grad(
            lambda p: (lambda out: (out[0][0], out[1]))(forward(p)), has_aux=True
        )(state.params)
        kd, kd_grads = jax.value_and_grad(lambda p: forward(p)[0][1])(state.params)

    if axis_name is not None:
        ce_grads, kd_grads, ce, kd = jax.lax.psum((ce_grads, kd_grads, ce, kd), axis_name)

    if kd_grads is None:
        updates, opt_state = tx.update(ce_grads, state.opt_state, state.params)
    else:
        updates, opt_state = tx.update(ce_grads, state.opt_state, state.params, kd_grads=kd_grads)
    params = optax.apply_updates(state.params, updates)

    # Per-exit sums over this step's examples; normalised by the trainer at log time.
    exit_ce = per_exit_ce(exit_logits, batch["labels"], weights, normalizer)
    if model.config.is_regression:
        exit_correct = jnp.zeros(exit_logits.shape[0])
    else:
        hits = jnp.argmax(exit_logits, -1) == batch["labels"][None, :]
        exit_correct = (hits * weights[None, :]).sum(-1)
    if axis_name is not None:
        exit_ce, exit_correct = jax.lax.psum((exit_ce, exit_correct), axis_name)
    metrics = {
        "ce": ce,
        "kd": kd,
        "exit_ce": exit_ce,
        "exit_correct": exit_correct,
        "count": count,
        "grad_norm_ce": optax.tree.norm(ce_grads),
        # Checked at log steps, before any checkpoint is written: a non-finite update is never saved.
        "params_finite": jnp.isfinite(optax.tree.norm(params)).astype(jnp.float32),
    }
    if method != "ce":
        metrics.update(alignment_diagnostics(opt_state))
    return TrainState(state.step + 1, params, opt_state), metrics


def _grad_ce_only(forward: Callable, params: PyTree):
    def ce_fn(p):
        (ce, kd), exit_logits = forward(p)
        return ce, (exit_logits, (ce, kd))

    grads, (exit_logits, losses) = jax.grad(ce_fn, has_aux=True)(params)
    return (grads, exit_logits), losses


# --------------------------------------------------------------------------- parallel wrappers

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over every device (all hosts' devices when running multi-host)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def shard_map_step(step_fn: Callable, mesh: Mesh) -> Callable:
    """``jit(shard_map(step))``: state replicated, batch split on its leading axis, state donated."""
    step = functools.partial(step_fn, axis_name=DATA_AXIS)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays split over the mesh."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Puts a host pytree on every device of the mesh (replicated)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def pmap_step(step_fn: Callable, devices: list | None = None) -> Callable:
    """The design card's form: ``jax.pmap`` over local devices; state replicated with a leading
    device axis (see :func:`pmap_replicate`), batch reshaped to [devices, per_device, ...]."""
    return jax.pmap(
        functools.partial(step_fn, axis_name=DATA_AXIS),
        axis_name=DATA_AXIS,
        in_axes=(0, 0, None),
        donate_argnums=0,
        devices=devices,
    )


def pmap_replicate(tree: PyTree, num_devices: int) -> PyTree:
    """Stacks ``num_devices`` copies of a host pytree: the layout :func:`pmap_step` expects."""
    return jax.tree.map(lambda x: np.stack([np.asarray(x)] * num_devices), tree)


def split_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}
