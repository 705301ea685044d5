"""The GAML train step: one pure function ``(state, batch, rng) -> (state, metrics)``.

CE and KD gradients are taken separately (``jax.grad`` on each loss, or one ``jax.vjp`` over
the shared forward and two pull-backs, the default; or the two pull-backs batched by
``jax.vmap``: the same numbers) and handed to the optax chain, whose first link
(``gradient_alignment``) projects the KD gradient off the CE one. The two ``jax.grad`` calls
cost no second forward: XLA merges their identical forwards (jax 0.10.2, XLA:CPU: the same
number of matrix products as the shared forward, FLOPs within 0.1%).

The only sign of parallelism inside the step is ``lax.psum`` over ``axis_name``: the losses
are normalised by the GLOBAL number of examples, so the summed per-device gradients are
exactly the gradients of the whole batch, and the projection sees the global gradients.
Parallelism is applied once, at the call site: :func:`shard_map_step` (a device mesh, the
form JAX recommends) or :func:`pmap_step` (the design card's ``jax.pmap``); both compute what
one device computes on the whole batch.

Whether a KD gradient is computed is decided by the optimizer alone: the step computes it
exactly when the optimizer has a :func:`gradient_alignment` link, its only consumer
(:func:`make_optimizer` adds one for ``ml`` and ``gaml``).
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

from gaml_jax import names
from gaml_jax.alignment import GradientAlignmentState, alignment_diagnostics, gradient_alignment
from gaml_jax.compilation import as_runtime_values, training_compiler_options
from gaml_jax.losses import ce_loss, exit_weights, mutual_learning_loss, per_exit_ce
from gaml_jax.model import MultiExitBert
from gaml_jax.prng import THREEFRY_UNROLLED

PyTree = Any
Batch = dict[str, jax.Array]

METHODS = ("ce", "ml", "gaml")  # plain multi-exit CE, mutual learning without GA, GAML
# vjp: one forward, two pull-backs (the default); grad: two jax.grad calls, as the design card
# writes it; vmap: one pull-back of both cotangents, batched (one backward pass of twice the batch:
# on the CPU 0.95-1.00 of the time and 7-50% longer to compile, measured on two boxes; for chips
# that small batches under-use).
GRAD_MODES = ("vjp", "grad", "vmap")


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: PyTree
    opt_state: optax.OptState


def _is_exit_classifier(path: tuple) -> bool:
    return names.is_classifier(str(getattr(path[0], "key", path[0])))


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


def flatten_by_group(
    inner: optax.GradientTransformationExtraArgs, group: Callable[[tuple, jax.Array], str]
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to a few flat vectors instead of a tree of ~100 tensors.

    Each tree (the updates, the parameters, and every extra argument such as ``kd_grads``) is
    cut into groups by ``group(path, leaf)`` and each group's leaves are concatenated, in tree
    order, into one vector: ``{group: vector}`` (a group of one leaf is that leaf raveled, no
    copy). ``inner`` sees that dict (its labels and masks must be written for its keys), and its
    updates are cut back into the tree's shapes and dtypes.
    The arithmetic is that of ``inner`` on the tree, element by element, with global reductions
    summed in another order. Why: every per-tensor operation of the chain (inner products, norms,
    the AdamW moments) is emitted once per group rather than once per tensor, which halves the
    compiled step (fewer HLO operations to compile and to load from the cache) at no cost in the
    step's speed. The optimizer state holds one vector per group and moment. The updates are cut
    at offsets XLA sees only at run time (:func:`gaml_jax.compilation.as_runtime_values`).
    """

    def layout(tree: PyTree) -> tuple[dict[str, list[int]], list]:
        return _layout(tree, group)

    def ravel(tree: PyTree) -> dict[str, jax.Array]:
        groups, leaves = layout(tree)
        return {
            key: jnp.ravel(leaves[indices[0]])
            if len(indices) == 1
            else jnp.concatenate([jnp.ravel(leaves[i]) for i in indices])
            for key, indices in groups.items()
        }

    def unravel(vectors: dict[str, jax.Array], like: PyTree) -> PyTree:
        groups, leaves = layout(like)
        out = list(leaves)
        for key, indices in groups.items():
            sizes = [int(np.prod(leaves[i].shape)) for i in indices]
            starts = np.cumsum([0, *sizes[:-1]])
            if len(indices) == 1:
                pieces = [vectors[key]]
            elif sum(sizes) < 2**31:  # int32 offsets
                # Each tensor's slice at an offset XLA sees only at run time: the updates of
                # same-shaped tensors (a layer's and the next layer's) are one compiled kernel.
                offsets = as_runtime_values(tuple(jnp.int32(o) for o in starts), vectors[key])
                pieces = [
                    jax.lax.dynamic_slice(vectors[key], (o,), (n,))
                    for o, n in zip(offsets, sizes, strict=True)
                ]
            else:
                pieces = jnp.split(vectors[key], starts[1:])
            for i, piece in zip(indices, pieces, strict=True):
                out[i] = piece.reshape(leaves[i].shape).astype(leaves[i].dtype)
        return jax.tree.unflatten(jax.tree.structure(like), out)

    def init_fn(params: optax.Params) -> optax.OptState:
        return inner.init(ravel(params))

    def update_fn(updates, state, params=None, **extra_args):
        extra = {k: ravel(v) if v is not None else v for k, v in extra_args.items()}
        flat_params = None if params is None else ravel(params)
        flat_updates, state = inner.update(ravel(updates), state, flat_params, **extra)
        return unravel(flat_updates, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Leaves at least this large are "large": each is its own group of the flat optimizer and enters
# _global_norm's sum on its own; the smaller ones (biases, LayerNorm scales, small exits) are
# concatenated, a cheap copy that spares operations to compile (docs/performance.md).
LARGE_LEAF_SIZE = 1 << 16


def _layout(tree: PyTree, group: Callable[[tuple, jax.Array], str]) -> tuple[dict[str, list[int]], list]:
    """``({group: indices of its leaves, in tree order}, leaves)``."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    groups: dict[str, list[int]] = {}
    for i, (path, leaf) in enumerate(with_paths):
        groups.setdefault(group(path, leaf), []).append(i)
    return groups, [leaf for _, leaf in with_paths]


def _group(path: tuple, leaf: jax.Array, own_group_size: int | None = LARGE_LEAF_SIZE) -> str:
    """The flat optimizer's groups: exit classifiers or encoder (their own learning rates), with or
    without weight decay, as ``"encoder/decay"``; a leaf of ``own_group_size`` elements or more is
    a group of its own, ``"encoder/decay/<its path>"``, so that no copy of it is made."""
    rate = "exits" if _is_exit_classifier(path) else "encoder"
    key = f"{rate}/{'decay' if _decays(path, leaf) else 'no_decay'}"
    if own_group_size is not None and leaf.size >= own_group_size:
        key += "/" + ".".join(str(getattr(p, "key", p)) for p in path)
    return key


def regroup_flat_state(state: optax.OptState, params: PyTree, template: optax.OptState) -> optax.OptState:
    """The flat optimizer's ``state`` (of :func:`make_optimizer` on ``params``) laid out as
    ``template``, a state of the same chain with the tensors grouped otherwise (e.g. with another
    ``own_group_size``): each tensor's slice of each moment vector moved to its group in
    ``template``, the same numbers; step counts and the other leaves as ``state`` holds them.

    Each layout is read from its vectors' keys (a tensor whose own key is among them is a group of
    its own). Resumes a run saved before the large tensors were groups of their own.
    """
    with_paths, _ = jax.tree_util.tree_flatten_with_path(params)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in with_paths]

    def layout_of(keys: set) -> dict[str, list[int]]:
        def group(path, leaf):
            own = _group(path, leaf, own_group_size=0)
            return own if own in keys else _group(path, leaf, own_group_size=None)

        return _layout(params, group)[0]

    def is_vectors(x) -> bool:  # a {group: vector} dict of the template (the AdamW moments)
        return isinstance(x, dict) and bool(x) and all(isinstance(k, str) and "/" in k for k in x)

    def move(new, old):
        if not is_vectors(new):
            return old
        pieces = {}
        for key, indices in layout_of(set(old)).items():
            if isinstance(old[key], optax.MaskedNode):  # another learning rate's tensors
                continue
            starts = np.cumsum([0, *(sizes[i] for i in indices)])
            for i, start, end in zip(indices, starts[:-1], starts[1:], strict=True):
                pieces[i] = old[key][start:end]
        return {
            key: new[key]
            if isinstance(new[key], optax.MaskedNode)
            else jnp.concatenate([pieces[i] for i in indices])
            for key, indices in layout_of(set(new)).items()
        }

    return jax.tree.map(move, template, state, is_leaf=is_vectors)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping as ``optax.clip_by_global_norm`` does it (the same condition, the same
    empty state), with the factor ``max_norm / norm`` computed once, as a scalar, rather than each
    element divided by the norm (the same numbers within an ulp). XLA:CPU does not repeat a division
    in each of its consumers: optax's form made it write the clipped gradients out (the MiniLM
    step's 22.7 M floats) before AdamW's two moments read them again; a product by a scalar it
    fuses into them (one-core MiniLM CE profile: 1161 against 1191 ms a step, the optimizer's
    operations 86 against 96 ms; docs/performance.md)."""

    def init_fn(params: optax.Params) -> optax.OptState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        norm = _global_norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


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
    flat: bool | None = None,
    own_group_size: int | None = LARGE_LEAF_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """GA (for ``ml``/``gaml``), global-norm clipping, then AdamW with its own rate for the exits.

    ``method="ce"`` has no GA link: :func:`train_step` then computes no KD gradient at all.
    ``flat`` (default: unless ``per_tensor_alignment``) runs the chain on a few flat vectors
    (:func:`flatten_by_group`): the same updates, a compiled step half the size, and an optimizer
    state of one vector per group, so checkpoints of the two forms do not restore into each other.
    The groups are the small tensors of each (exits | encoder, decay | no decay) pair concatenated,
    and each tensor of ``own_group_size`` elements or more on its own (``None``: every tensor
    concatenated, the form before; a step that copies all gradients and parameters each update,
    2-6% slower on the CPU, docs/performance.md).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown training method {method!r}; choose one of {METHODS}.")
    # The chain runs on one vector per (exits | encoder, decay | no decay) group (see
    # flatten_by_group), unless flat=False. Per-tensor alignment needs the tensors: it keeps the tree.
    if flat and per_tensor_alignment:
        raise ValueError("per_tensor_alignment aligns each tensor: it needs flat=False (or None).")
    flat = not per_tensor_alignment if flat is None else flat

    def decays(params: PyTree) -> PyTree:
        if flat:
            return {key: key.split("/")[1] == "decay" for key in params}
        return jax.tree_util.tree_map_with_path(_decays, params)

    def adamw(peak: float) -> optax.GradientTransformation:
        return optax.adamw(
            learning_rate_schedule(peak, warmup_steps, total_steps), weight_decay=weight_decay, mask=decays
        )

    def labels(params: PyTree) -> PyTree:
        if flat:
            return {key: key.split("/")[0] for key in params}
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "exits" if _is_exit_classifier(path) else "encoder", params
        )

    links = []
    if method != "ce":
        links.append(gradient_alignment(kd_weight, per_tensor=per_tensor_alignment, align=method == "gaml"))
    if grad_clip_norm and grad_clip_norm > 0:
        links.append(clip_by_global_norm(grad_clip_norm))
    links.append(
        optax.multi_transform({"encoder": adamw(learning_rate), "exits": adamw(exit_learning_rate)}, labels)
    )
    chain = optax.chain(*links)
    group = functools.partial(_group, own_group_size=own_group_size)
    return flatten_by_group(chain, group) if flat else chain


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """Step 0, ``params`` as given, and ``tx``'s state, made by one compiled program (eagerly, the
    flat optimizer's state took dozens of small programs to compile on a cold start)."""
    return TrainState(step=jax.device_put(np.int32(0)), params=params, opt_state=jax.jit(tx.init)(params))


def uses_kd(opt_state: optax.OptState) -> bool:
    """True if the optimizer has a gradient-alignment link, the consumer of ``kd_grads``.

    Decided from the structure of the state (static under ``jit``): the training method is
    chosen once, by the optimizer, and the step cannot compute KD gradients nobody uses.
    """
    return bool(optax.tree_utils.tree_get_all_with_path(opt_state, GradientAlignmentState.__name__))


# The dropout stream's PRNG: JAX's threefry2x32 with its hash written out (gaml_jax.prng), the same
# bits as jax.random.key(seed) without the loop JAX:CPU puts in every hash. Measured side by side
# (bench/bench_cpu_options.py --rng-a/--rng-b; figures in docs/performance.md).
# JAX's "rbg" (XLA's RngBitGenerator) was measured too and not taken: the MiniLM GAML step alone
# compiled in 13.6 +- 0.9 s against 15.5 +- 2.2 s (six compiles each, a noisy 2-core box) and ran
# ~3% faster, but a whole cold 20-step train.py run compiled no less (37.1-40.3 s against
# 37.8-39.0 s) and a warm one took 9.1-11.4 s against 6.6-6.9 s.
DROPOUT_RNG_IMPL = THREEFRY_UNROLLED


def dropout_key(seed: int) -> jax.Array:
    """The base key of a run's dropout stream (``train_step``'s ``rng``)."""
    return jax.random.key(seed, impl=DROPOUT_RNG_IMPL)


def train_step(
    state: TrainState,
    batch: Batch,
    rng: jax.Array,
    *,
    model: MultiExitBert,
    tx: optax.GradientTransformationExtraArgs,
    temperature: float = 1.0,
    exit_weighting: str = "layer",
    grad_mode: str = "vjp",
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One GAML update on ``batch`` (this device's shard when ``axis_name`` is set).

    ``rng`` is the run's base key: the step's key is derived from it and the step number (and
    the device index), never carried, so a resumed run replays exactly. The method (CE only, or
    CE and KD gradients) follows from ``tx``: see :func:`uses_kd`.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"Unknown grad_mode {grad_mode!r}; choose one of {GRAD_MODES}.")
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    # The step's key is computed once, not again inside each dropout site's kernel (gaml_jax.prng).
    rng = jax.lax.optimization_barrier(rng)
    weights = batch["weights"]
    count = weights.sum()
    if axis_name is not None:
        count = jax.lax.psum(count, axis_name)
    normalizer = jnp.maximum(count, 1.0)
    exit_w = jnp.asarray(exit_weights(model.config.exits, exit_weighting))
    with_kd = uses_kd(state.opt_state)
    local_params = state.params
    if axis_name is not None:
        # Differentiate each device's loss w.r.t. its own (varying) copy of the parameters, so
        # that the psum below is the only reduction. Under shard_map's varying-axes check, the
        # gradient w.r.t. replicated (invariant) parameters is already summed over the mesh, and
        # the psum would count it once per device. A no-op under pmap, which does not check.
        local_params = jax.lax.pcast(local_params, axis_name, to="varying")

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
        kd = mutual_learning_loss(exit_logits, weights, temperature, normalizer) if with_kd else 0.0
        return (ce, jnp.asarray(kd, jnp.float32)), exit_logits

    if not with_kd:
        (ce_grads, exit_logits), (ce, kd) = _grad_ce_only(forward, local_params)
        kd_grads = None
    elif grad_mode in ("vjp", "vmap"):
        (ce, kd), pull_back, exit_logits = jax.vjp(forward, local_params, has_aux=True)
        one, zero = jnp.ones_like(ce), jnp.zeros_like(ce)  # same type as the loss (varying under shard_map)
        if grad_mode == "vjp":
            (ce_grads,) = pull_back((one, zero))
            (kd_grads,) = pull_back((zero, one))
        else:
            (grads,) = jax.vmap(pull_back)((jnp.stack([one, zero]), jnp.stack([zero, one])))
            ce_grads, kd_grads = jax.tree.map(lambda g: g[0], grads), jax.tree.map(lambda g: g[1], grads)
    else:  # Two independent jax.grad calls, as the design card writes it.
        (ce, exit_logits), ce_grads = jax.value_and_grad(
            lambda p: (lambda out: (out[0][0], out[1]))(forward(p)), has_aux=True
        )(local_params)
        kd, kd_grads = jax.value_and_grad(lambda p: forward(p)[0][1])(local_params)

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
        "grad_norm_ce": _global_norm(ce_grads),
        # Checked at log steps, before any checkpoint is written: a non-finite update is never saved.
        "params_finite": jnp.isfinite(_global_norm(params)).astype(jnp.float32),
    }
    if with_kd:
        metrics.update(alignment_diagnostics(opt_state))
    return TrainState(state.step + 1, params, opt_state), metrics


def _global_norm(tree: PyTree) -> jax.Array:
    """The float32 L2 norm of all leaves: each large leaf's sum of squares, added.

    Not the norm of all the leaves concatenated into one vector: XLA then writes that copy of the
    whole tree (every parameter or gradient, twice per step for the two metrics) before reading it
    again (35 ms of a 1.3 s one-core MiniLM step). The small leaves are concatenated (see
    ``LARGE_LEAF_SIZE``): a reduction per leaf adds operations to compile (docs/performance.md)."""
    leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
    small = [x for x in leaves if x.size < LARGE_LEAF_SIZE]
    large = [x for x in leaves if x.size >= LARGE_LEAF_SIZE]
    if small:
        large.append(jnp.concatenate(small))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in large))


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
    """``jit(shard_map(step))``: state replicated, batch split on its leading axis, state donated;
    compiled with ``compilation.training_compiler_options()`` (on the CPU, XLA's FAST_COMPILE
    preset)."""
    step = functools.partial(step_fn, axis_name=DATA_AXIS)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0, compiler_options=training_compiler_options())


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
    """``num_devices`` copies of a host pytree on a new leading axis: the layout :func:`pmap_step`
    expects. A broadcast view: the host holds one copy, whatever the number of devices."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices, *np.shape(x))), tree)


def split_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}
