"""The GAML step: against a numpy projection of separately computed gradients, and N devices
against one device on the same global batch."""

import collections
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gaml_jax.alignment import gradient_alignment
from gaml_jax.config import ModelConfig
from gaml_jax.losses import ce_loss, exit_weights, mutual_learning_loss
from gaml_jax.model import MultiExitBert
from gaml_jax.train_step import (
    LARGE_LEAF_SIZE,
    create_train_state,
    data_mesh,
    make_optimizer,
    pmap_replicate,
    pmap_step,
    regroup_flat_state,
    replicate,
    shard_batch,
    shard_map_step,
    split_for_pmap,
    train_step,
    uses_kd,
)

# No dropout: N devices draw other dropout masks than one device does, by design.
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=3,
)
BATCH, SEQ = 16, 12
OPT = dict(total_steps=10, learning_rate=1e-3, exit_learning_rate=1e-2, warmup_steps=2, kd_weight=0.7)


def make_batch(seed: int, config: ModelConfig = CONFIG) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, SEQ + 1, BATCH)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    weights = np.ones(BATCH, np.float32)
    weights[-3:] = 0.0  # padding examples, as in a padded last batch
    labels = (
        rng.normal(size=BATCH).astype(np.float32)
        if config.is_regression
        else rng.integers(0, config.num_labels, BATCH).astype(np.int32)
    )
    return {
        "input_ids": (rng.integers(1, config.vocab_size, (BATCH, SEQ)) * mask).astype(np.int32),
        "attention_mask": mask,
        "token_type_ids": (rng.random((BATCH, SEQ)) < 0.3).astype(np.int32) * mask,
        "labels": labels,
        "weights": weights,
    }


def init_params(config: ModelConfig = CONFIG, seed: int = 0):
    model = MultiExitBert(config)
    params = model.init(jax.random.key(seed), jnp.ones((1, SEQ), jnp.int32))["params"]
    # Non-trivial exits: random classifiers with a larger scale make the exits disagree.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 20 if str(p[0].key).startswith("classifier") else x, params
    )
    return model, params


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _unflat(vector: np.ndarray, like):
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for leaf in leaves:
        out.append(jnp.asarray(vector[i : i + leaf.size].reshape(leaf.shape), leaf.dtype))
        i += leaf.size
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("method", ["gaml", "ml", "ce"])
@pytest.mark.parametrize("param_seed,batch_seed,conflicts", [(0, 1, False), (3, 5, True)])
def test_step_matches_separate_grads_and_numpy_projection(method, param_seed, batch_seed, conflicts):
    model, params = init_params(seed=param_seed)
    batch = make_batch(batch_seed)
    exit_w = exit_weights(CONFIG.exits, "layer")

    def logits_of(p):
        return model.apply(
            {"params": p},
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits

    ce_g = _flat(jax.grad(lambda p: ce_loss(logits_of(p), batch["labels"], batch["weights"], exit_w))(params))
    kd_g = _flat(jax.grad(lambda p: mutual_learning_loss(logits_of(p), batch["weights"], 2.0))(params))
    dot = ce_g @ kd_g
    assert (dot < 0) == conflicts  # the seeds cover both branches of the projection
    cosine = dot / np.sqrt((ce_g @ ce_g) * (kd_g @ kd_g))
    if method == "gaml" and dot < 0:
        kd_g = kd_g - dot / (ce_g @ ce_g) * ce_g
    combined = ce_g if method == "ce" else ce_g + OPT["kd_weight"] * kd_g

    # Reference: the aligned gradient through the rest of the chain (clip + AdamW), no GA link.
    rest = make_optimizer(method="ce", **OPT)
    updates, _ = rest.update(_unflat(combined, params), rest.init(params), params)
    expected = jax.tree.map(lambda p, u: p + u, params, updates)

    tx = make_optimizer(method=method, **OPT)
    state = create_train_state(params, tx)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, temperature=2.0))
    new_state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0))
    np.testing.assert_allclose(_flat(new_state.params), _flat(expected), atol=1e-6)
    assert int(new_state.step) == 1
    if method != "ce":
        # With align=False ("ml") the state still reports the conflict GA would have removed.
        assert float(metrics["projected"]) == float(conflicts)
        np.testing.assert_allclose(float(metrics["grad_cosine"]), cosine, rtol=1e-4)


def test_vjp_and_grad_modes_agree():
    model, params = init_params()
    tx = make_optimizer(method="gaml", **OPT)
    batch = {k: jnp.asarray(v) for k, v in make_batch(2).items()}
    outs = []
    for mode in ("vjp", "grad", "vmap"):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, grad_mode=mode))
        outs.append(step(create_train_state(params, tx), batch, jax.random.key(0))[0].params)
    for out in outs[1:]:
        np.testing.assert_allclose(_flat(out), _flat(outs[0]), atol=1e-7)


def _run_one_device(config, params, model, batches, method):
    tx = make_optimizer(method=method, **OPT)
    state = create_train_state(params, tx)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))
    metrics = []
    for b in batches:
        state, m = step(state, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(3))
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize(
    "method, regression, grad_mode",
    [(method, regression, "vjp") for method in ("gaml", "ce") for regression in (False, True)]
    + [("gaml", False, "vmap")],  # both pull-backs batched, under shard_map
)
def test_eight_devices_match_one_device(method, regression, grad_mode):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    config = CONFIG.replace(num_labels=1) if regression else CONFIG
    model, params = init_params(config)
    batches = [make_batch(10 + i, config) for i in range(3)]
    one, one_metrics = _run_one_device(config, params, model, batches, method)

    tx = make_optimizer(method=method, **OPT)
    mesh = data_mesh()
    state = replicate(create_train_state(params, tx), mesh)
    step = shard_map_step(functools.partial(train_step, model=model, tx=tx, grad_mode=grad_mode), mesh)
    for i, b in enumerate(batches):
        state, m = step(state, shard_batch(b, mesh), jax.random.key(3))
        np.testing.assert_allclose(float(m["ce"]), float(one_metrics[i]["ce"]), rtol=1e-5)
        # AdamW and clipping hide a global scale of the gradients: compare their norm as well.
        np.testing.assert_allclose(float(m["grad_norm_ce"]), float(one_metrics[i]["grad_norm_ce"]), rtol=1e-5)
        np.testing.assert_allclose(float(m["kd"]), float(one_metrics[i]["kd"]), rtol=1e-5, atol=1e-7)
    # AdamW divides by sqrt(v): rounding in near-zero gradients is amplified (STACK.md), hence 1e-4.
    np.testing.assert_allclose(_flat(state.params), _flat(one.params), atol=1e-4)
    assert int(state.step) == 3


def test_pmap_matches_one_device():
    model, params = init_params()
    batches = [make_batch(20 + i) for i in range(3)]
    one, _ = _run_one_device(CONFIG, params, model, batches, "gaml")
    tx = make_optimizer(method="gaml", **OPT)
    n = jax.local_device_count()
    state = pmap_replicate(create_train_state(params, tx), n)
    step = pmap_step(functools.partial(train_step, model=model, tx=tx))
    for b in batches:
        state, _ = step(state, split_for_pmap(b, n), jax.random.key(3))
    per_device = [_flat(jax.tree.map(lambda x, i=i: x[i], state.params)) for i in range(n)]
    for flat in per_device[1:]:
        np.testing.assert_array_equal(flat, per_device[0])  # replicas never drift apart
    np.testing.assert_allclose(per_device[0], _flat(one.params), atol=1e-4)


class RecordedGrads(NamedTuple):
    ce_grads: Any
    kd_grads: Any


def record_grads() -> optax.GradientTransformationExtraArgs:
    """Keeps the step's CE and KD gradients (as the optimizer receives them) in its state."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return RecordedGrads(zeros, zeros)

    def update_fn(updates, state, params=None, *, kd_grads, **extra_args):
        del state, params, extra_args
        return updates, RecordedGrads(updates, kd_grads)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@pytest.mark.parametrize("form", ["shard_map", "pmap"])
def test_devices_compute_the_one_device_gradients_and_sgd_steps(form):
    """Plain SGD without clipping shows any scale error of the gradients (AdamW and clipping hide
    a global one): 8 devices must give the CE and KD gradients of 1 device, and its parameters."""
    model, params = init_params()
    batches = [make_batch(30 + i) for i in range(3)]
    tx = optax.chain(record_grads(), gradient_alignment(OPT["kd_weight"]), optax.sgd(0.5))
    fn = functools.partial(train_step, model=model, tx=tx)

    one_step = jax.jit(fn)
    one = create_train_state(params, tx)
    expected = []
    for b in batches:
        one, m = one_step(one, {k: jnp.asarray(v) for k, v in b.items()}, jax.random.key(3))
        expected.append((float(m["grad_norm_ce"]), jax.device_get(one.opt_state[0])))

    if form == "shard_map":
        mesh = data_mesh()
        state = replicate(create_train_state(params, tx), mesh)
        step = shard_map_step(fn, mesh)
        put, first = (lambda b: shard_batch(b, mesh)), (lambda tree: tree)
    else:
        n = jax.local_device_count()
        state = pmap_replicate(create_train_state(params, tx), n)
        step = pmap_step(fn)
        put, first = (lambda b: split_for_pmap(b, n)), (lambda tree: jax.tree.map(lambda x: x[0], tree))
    # A wrong scale errs by the gradient itself (N times it). float32 sums taken in another order
    # over 8 devices, then amplified by SGD at rate 0.5, reached 6e-6 of the largest gradient at
    # step 3 on an AVX-512 CPU (4e-7 before it): the bound is 2e-5 of the largest.
    for b, (grad_norm, recorded) in zip(batches, expected, strict=True):
        state, m = step(state, put(b), jax.random.key(3))
        np.testing.assert_allclose(float(first(m)["grad_norm_ce"]), grad_norm, rtol=1e-6)
        got = jax.device_get(first(state.opt_state[0]))
        for ours, reference in ((got.ce_grads, recorded.ce_grads), (got.kd_grads, recorded.kd_grads)):
            reference = _flat(reference)
            np.testing.assert_allclose(_flat(ours), reference, atol=2e-5 * np.abs(reference).max())
    np.testing.assert_allclose(_flat(first(state.params)), _flat(one.params), atol=1e-5)
    assert np.abs(_flat(one.params) - _flat(params)).max() > 1e-2  # SGD really moved them


@pytest.mark.parametrize("method", ["ce", "ml", "gaml"])
def test_the_optimizer_alone_decides_whether_kd_is_computed(method):
    """The step takes no method of its own: a CE-only optimizer gets no KD gradient computed (the
    KD loss is not even evaluated), an ml/gaml one gets it, with the alignment diagnostics."""
    model, params = init_params()
    tx = make_optimizer(method=method, **OPT)
    state = create_train_state(params, tx)
    assert uses_kd(state.opt_state) == (method != "ce")
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))
    _, metrics = step(state, {k: jnp.asarray(v) for k, v in make_batch(4).items()}, jax.random.key(0))
    if method == "ce":
        assert float(metrics["kd"]) == 0.0 and "grad_cosine" not in metrics
    else:
        assert float(metrics["kd"]) > 0.0 and "grad_cosine" in metrics


def test_vjp_pull_backs_give_the_gradients_of_two_grad_calls_under_dropout():
    # The vjp mode pulls both cotangents back through one forward (the vmap mode, both at once);
    # under dropout both must see the forward's masks. Reference: two independent jax.grad calls
    # (grad mode) with the same key. A first link records the CE and KD gradients the chain
    # receives; GA follows as usual.
    import optax

    from gaml_jax.alignment import gradient_alignment

    config = CONFIG.replace(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model, params = init_params(config)

    def record() -> optax.GradientTransformationExtraArgs:
        def init(p):
            return {"ce": jax.tree.map(jnp.zeros_like, p), "kd": jax.tree.map(jnp.zeros_like, p)}

        def update(updates, state, params=None, *, kd_grads=None, **extra):
            del state, params, extra
            return updates, {"ce": updates, "kd": kd_grads}

        return optax.GradientTransformationExtraArgs(init, update)

    tx = optax.chain(record(), gradient_alignment(0.7), optax.sgd(0.1))
    batch = {k: jnp.asarray(v) for k, v in make_batch(4, config).items()}
    grads = {}
    for mode in ("vjp", "grad", "vmap"):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, grad_mode=mode))
        grads[mode] = step(create_train_state(params, tx), batch, jax.random.key(7))[0].opt_state[0]
    no_dropout = jax.jit(functools.partial(train_step, model=init_params()[0], tx=tx))
    plain = no_dropout(create_train_state(params, tx), batch, jax.random.key(7))[0].opt_state[0]
    for name in ("ce", "kd"):
        vjp = _flat(grads["vjp"][name])
        assert np.abs(vjp).max() > 0 and not np.allclose(vjp, _flat(plain[name]), atol=1e-4)  # dropout acted
        for mode in ("grad", "vmap"):
            other = _flat(grads[mode][name])
            np.testing.assert_allclose(vjp, other, rtol=1e-5, atol=1e-6 * np.abs(other).max(), err_msg=mode)


def _numpy_adamw_steps(params, grads_per_step, *, weight_decay, clip, rates_of):
    """Global-norm clipping and AdamW (optax's defaults: b1 0.9, b2 0.999, eps 1e-8), in numpy on
    each leaf: ``rates_of(path)`` gives the leaf's learning rate by update; biases and LayerNorm
    parameters are not decayed."""
    paths_params, treedef = jax.tree_util.tree_flatten_with_path(params)
    p = [np.asarray(x, np.float64) for _, x in paths_params]
    mu = [np.zeros_like(x) for x in p]
    nu = [np.zeros_like(x) for x in p]
    for t, grads in enumerate(grads_per_step, start=1):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        norm = np.sqrt(sum((x**2).sum() for x in g))
        g = [x * min(1.0, clip / norm) for x in g]
        for i, (path, _) in enumerate(paths_params):
            keys = [str(getattr(k, "key", k)) for k in path]
            decays = not (keys[-1] == "bias" or any("LayerNorm" in k for k in keys))
            mu[i] = 0.9 * mu[i] + 0.1 * g[i]
            nu[i] = 0.999 * nu[i] + 0.001 * g[i] ** 2
            update = (mu[i] / (1 - 0.9**t)) / (np.sqrt(nu[i] / (1 - 0.999**t)) + 1e-8)
            update = update + (weight_decay * p[i] if decays else 0.0)
            p[i] = p[i] - rates_of(keys)[t - 1] * update
    return jax.tree.unflatten(treedef, p)


@pytest.mark.parametrize("max_norm", [0.5, 50.0], ids=["acting", "idle"])
def test_clipping_scales_by_the_global_norm_as_numpy_and_optax_do(max_norm):
    from gaml_jax.train_step import clip_by_global_norm

    rng = np.random.default_rng(3)
    grads = {
        "a": rng.normal(size=(7, 5)).astype(np.float32),
        "b": {"c": rng.normal(size=11).astype(np.float32)},
    }
    norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(grads)))
    assert (norm > max_norm) == (max_norm == 0.5)
    want = jax.tree.map(lambda x: x * min(1.0, max_norm / norm), grads)
    tx, reference = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    got, state = jax.jit(tx.update)(grads, tx.init(grads))
    theirs, _ = reference.update(grads, reference.init(grads))
    for g, w, t in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
        np.testing.assert_allclose(g, t, rtol=1e-6, atol=0)
    assert jax.tree.structure(state) == jax.tree.structure(reference.init(grads))  # checkpoints restore
    if max_norm == 50.0:
        for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(grads), strict=True):
            np.testing.assert_array_equal(g, x)  # untouched below the threshold


@pytest.mark.parametrize("own_group_size", [LARGE_LEAF_SIZE, 1000, None])
def test_the_flat_optimizer_is_clipping_and_adamw_per_tensor_with_exit_rates_and_decay_masks(own_group_size):
    """make_optimizer runs its chain on one vector per (exits | encoder, decay | no decay) group,
    each large tensor (own_group_size) a group of its own: against per-leaf numpy AdamW over
    several steps, with weight decay on, the exits' own rate and clipping that acts; and its state
    is a few vectors, a large tensor's moments of its own size, not one entry per tensor."""
    _, params = init_params()
    opt = dict(OPT, weight_decay=0.1, grad_clip_norm=0.5, learning_rate=1e-2, exit_learning_rate=5e-2)
    tx = make_optimizer(method="ce", own_group_size=own_group_size, **opt)
    state = tx.init(params)
    rng = np.random.default_rng(0)
    grads_per_step = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(4)
    ]
    got = params
    update = jax.jit(tx.update)
    for grads in grads_per_step:
        updates, state = update(grads, state, got)
        got = optax.apply_updates(got, updates)
    from gaml_jax.train_step import learning_rate_schedule

    def rates_of(keys):
        peak = opt["exit_learning_rate"] if keys[0].startswith("classifier") else opt["learning_rate"]
        return np.asarray(
            jax.vmap(learning_rate_schedule(peak, opt["warmup_steps"], opt["total_steps"]))(jnp.arange(4))
        )

    want = _numpy_adamw_steps(params, grads_per_step, weight_decay=0.1, clip=0.5, rates_of=rates_of)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-6)
    assert np.abs(_flat(got) - _flat(params)).max() > 1e-2  # the steps really moved them
    arrays = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    sizes = [x.size for x in jax.tree.leaves(params)]
    large = [n for n in sizes if own_group_size is not None and n >= own_group_size]
    assert len(arrays) == 2 * (4 + len(large)) and all(x.ndim == 1 for x in arrays)  # mu, nu per group
    assert not collections.Counter(large * 2) - collections.Counter(x.size for x in arrays)  # own moments
    assert sum(x.size for x in arrays) == 2 * sum(sizes)
    # The tree form of the same chain (flat=False) takes the same steps.
    tree_tx = make_optimizer(method="ce", flat=False, **opt)
    tree_state, tree_got = tree_tx.init(params), params
    for grads in grads_per_step:
        updates, tree_state = jax.jit(tree_tx.update)(grads, tree_state, tree_got)
        tree_got = optax.apply_updates(tree_got, updates)
    np.testing.assert_allclose(_flat(got), _flat(tree_got), rtol=1e-6, atol=1e-7)
    assert len([x for x in jax.tree.leaves(tree_state) if x.ndim > 0]) == 2 * len(jax.tree.leaves(params))


def test_a_flat_state_regrouped_takes_the_steps_the_old_layout_would_have_taken():
    """regroup_flat_state moves a GAML optimizer state saved with every tensor concatenated
    (own_group_size=None, the layout before) into one with tensors of their own: the next updates
    are those the old layout computes (global sums in another order aside), and regrouping back
    gives the saved state bit for bit."""
    _, params = init_params()
    opt = dict(OPT, weight_decay=0.1, grad_clip_norm=0.5)
    old_tx = make_optimizer(method="gaml", own_group_size=None, **opt)
    new_tx = make_optimizer(method="gaml", own_group_size=1000, **opt)
    rng = np.random.default_rng(0)

    def grads():
        return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)

    state = old_tx.init(params)
    for _ in range(2):
        _, state = jax.jit(old_tx.update)(grads(), state, params, kd_grads=grads())
    regrouped = regroup_flat_state(state, params, new_tx.init(params))
    assert jax.tree.structure(regrouped) == jax.tree.structure(new_tx.init(params))
    assert jax.tree.structure(regrouped) != jax.tree.structure(state)
    back = regroup_flat_state(regrouped, params, old_tx.init(params))
    for want, got in zip(jax.tree.leaves(state), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ce, kd = grads(), grads()
    want, _ = jax.jit(old_tx.update)(ce, state, params, kd_grads=kd)
    got, _ = jax.jit(new_tx.update)(ce, regrouped, params, kd_grads=kd)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-5, atol=1e-8)
    # Against a fresh state the same gradients move the parameters otherwise: the moments matter.
    fresh, _ = jax.jit(new_tx.update)(ce, new_tx.init(params), params, kd_grads=kd)
    assert np.abs(_flat(fresh) - _flat(want)).max() > 1e-3


def test_per_tensor_alignment_keeps_the_tree_and_matches_whole_model_alignment_on_one_leaf():
    """per_tensor_alignment needs the tensors: its optimizer keeps one state entry per leaf. On a
    model of one tensor, per-tensor and whole-model alignment are the same step."""
    params = {"layer_0": {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)}}
    ce = {"layer_0": {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)}}
    kd = jax.tree.map(lambda g: -g + 0.1, ce)  # conflicts
    out = {}
    for per_tensor in (False, True):
        tx = make_optimizer(method="gaml", per_tensor_alignment=per_tensor, **OPT)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(ce, state, params, kd_grads=kd)
        out[per_tensor] = (updates, state)
    np.testing.assert_allclose(_flat(out[True][0]), _flat(out[False][0]), rtol=1e-6, atol=1e-9)
    tree_moment = [x for x in jax.tree.leaves(out[True][1]) if x.ndim == 2]
    assert tree_moment and all(x.shape == (5, 3) for x in tree_moment)
