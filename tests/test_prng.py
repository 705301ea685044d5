"""The dropout stream's PRNG (gaml_jax.prng): JAX's threefry2x32, bit for bit, with no loops.

References: the Threefry-2x32 known-answer vectors of Random123 (Salmon et al., SC 2011), and
JAX's own threefry2x32 keys (``jax.random.key(seed)``) for every operation a key supports.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaml_jax import compilation
from gaml_jax import model as model_lib
from gaml_jax.prng import THREEFRY_UNROLLED, threefry2x32
from gaml_jax.train_step import DROPOUT_RNG_IMPL, create_train_state, dropout_key, make_optimizer, train_step

# Random123's kat_vectors for threefry2x32_20: (key, counter) -> hash.
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.fixture(autouse=True)
def partitionable_threefry():
    # JAX's default (since 0.5), the scheme THREEFRY_UNROLLED computes; set here in case a user's
    # environment changed it.
    with jax.threefry_partitionable(True):
        yield


def _pair(key):
    return jax.random.key(key, impl="threefry2x32"), jax.random.key(key, impl=THREEFRY_UNROLLED)


def _data(keys):
    return np.asarray(jax.random.key_data(keys))


def test_the_hash_gives_the_known_answers():
    for key, counter, expected in KNOWN_ANSWERS:
        words = jax.jit(threefry2x32)(*jnp.asarray(key, jnp.uint32), *jnp.asarray(counter, jnp.uint32))
        assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 - 1])
def test_every_key_operation_gives_jax_threefry_bits(seed):
    theirs, ours = _pair(seed)
    np.testing.assert_array_equal(_data(ours), _data(theirs))
    for shape in [(), (1,), (7,), (3, 5), (2, 3, 4)]:
        for dtype in ("uint8", "uint16", "uint32"):
            np.testing.assert_array_equal(
                jax.random.bits(ours, shape, dtype=dtype), jax.random.bits(theirs, shape, dtype=dtype)
            )
    for shape in [5, (2, 3)]:
        np.testing.assert_array_equal(
            _data(jax.random.split(ours, shape)), _data(jax.random.split(theirs, shape))
        )
    for data in [0, 3, 12345, 2**32 - 1]:
        np.testing.assert_array_equal(
            _data(jax.random.fold_in(ours, data)), _data(jax.random.fold_in(theirs, data))
        )
    draw = jax.jit(jax.vmap(lambda k: (jax.random.uniform(k, (4, 6)), jax.random.bernoulli(k, 0.9, (4, 6)))))
    for a, b in zip(draw(jax.random.split(ours, 3)), draw(jax.random.split(theirs, 3)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_train_step_draws_the_masks_of_jax_threefry_without_a_loop(monkeypatch):
    from tests.test_train_step import CONFIG, init_params, make_batch

    assert DROPOUT_RNG_IMPL is THREEFRY_UNROLLED  # the trainer's stream (dropout_key) is the one tested
    config = CONFIG.replace(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model, params = init_params(config)
    tx = make_optimizer(
        method="gaml", total_steps=10, learning_rate=1e-3, exit_learning_rate=1e-2, warmup_steps=2
    )
    batch = {k: jnp.asarray(v) for k, v in make_batch(3, config).items()}

    def two_steps(key):
        step = jax.jit(functools.partial(train_step, model=model, tx=tx))  # traced anew
        state = create_train_state(params, tx)
        for _ in range(2):
            state, metrics = step(state, batch, key)
        return jax.tree.leaves((state.params, metrics))

    jax_key, our_key = jax.random.key(5, impl="threefry2x32"), dropout_key(5)
    # The same masks, so the same numbers: bit for bit with every row of the last layer computed.
    with monkeypatch.context() as patch:
        patch.setattr(model_lib, "CLS_ONLY_LAST_LAYER", False)
        for a, b in zip(two_steps(our_key), two_steps(jax_key), strict=True):
            np.testing.assert_array_equal(a, b)
    # With its [CLS] row only (the default), XLA fuses our bits, but not JAX's loop, into the
    # layer's kernels, which may round a product apart by an ulp; a mask apart errs by far more.
    # (atol: the key biases' gradients are rounding noise about zero, softmax ignoring a shift
    # shared by all keys, and so are their values after two steps, about 1e-8.)
    for a, b in zip(two_steps(our_key), two_steps(jax_key), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx))
    # Dropout acted: the losses and gradients differ from those of the model without dropout.
    no_dropout = jax.jit(functools.partial(train_step, model=init_params()[0], tx=tx))
    _, plain = no_dropout(create_train_state(params, tx), batch, dropout_key(5))
    _, masked = step(create_train_state(params, tx), batch, dropout_key(5))
    for name in ("ce", "kd", "grad_norm_ce"):
        assert abs(float(masked[name]) - float(plain[name])) > 1e-4 * abs(float(plain[name])), name

    # JAX lowers threefry2x32 on the CPU as a loop per hash; our step has none. (The step's only
    # other loops are those of compilation.as_runtime_values, which never run: off here.)
    monkeypatch.setattr(compilation, "SHARE_KERNELS", False)

    def loops(key) -> int:
        fresh = jax.jit(functools.partial(train_step, model=model, tx=tx))  # traced anew, without them
        return fresh.lower(create_train_state(params, tx), batch, key).as_text().count("stablehlo.while")

    assert loops(dropout_key(5)) == 0
    if jax.default_backend() == "cpu":
        assert loops(jax.random.key(5, impl="threefry2x32")) > 0
