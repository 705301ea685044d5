"""The dropout stream's PRNG: JAX's threefry2x32, with the hash written out instead of looped.

On the CPU, JAX lowers each threefry2x32 hash as a ``while`` loop over its five groups of four
rounds (it keeps programs small). A training step hashes at every dropout site and at every key
Flax derives for one (``make_rng`` folds the module path in): the MiniLM GAML step had 53 such
loops, each with a body and a condition of its own, apart from the masks' kernels. Written out,
the rounds are plain integer operations that XLA fuses into the kernels that draw the masks.

:data:`THREEFRY_UNROLLED` is a PRNG implementation (``jax.extend.random.define_prng_impl``)
that computes exactly JAX's partitionable threefry2x32 (``jax_threefry_partitionable``, JAX's
default): the same key from a seed, the same bits, splits and folds, bit for bit (tested), so
the masks, and a run, are those of ``jax.random.key(seed)``. Only the compiled program changes.

Written out, a key's derivation (the step's fold-ins, the layer's split, Flax's fold-in of the
module path) fuses into each dropout site's kernel, recomputed there. The step's key and the
layers' keys therefore pass through ``lax.optimization_barrier`` (``train_step``,
``MultiExitBert._encode``): computed once, then read by the sites.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import define_prng_impl, threefry_prng_impl

# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): 20
# rounds in five groups of four, rotation constants alternating between these two rows, a key
# word injected after each group; the third key word is the two others and this parity constant.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def threefry2x32(
    key1: jax.Array, key2: jax.Array, x1: jax.Array, x2: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash of the uint32 counter pairs ``(x1, x2)`` under the key
    ``(key1, key2)``, elementwise (the key words broadcast); its 20 rounds written out."""
    keys = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x1 = x1 + x2
            x2 = (x2 << np.uint32(rotation)) | (x2 >> np.uint32(32 - rotation))
            x2 = x1 ^ x2
        x1 = x1 + keys[(group + 1) % 3]
        x2 = x2 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x1, x2


def _hashed_counters(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The hash of every element's 64-bit row-major index in ``shape`` (as a (high, low) uint32
    counter pair) under ``key``: what JAX's partitionable splits and bits are made of."""
    size = math.prod(shape)
    if size >= 2**32:
        raise NotImplementedError(f"random bits of {size} elements: at most 2**32 - 1 per draw.")
    low = jax.lax.iota(np.uint32, size).reshape(shape)
    return threefry2x32(key[0], key[1], jnp.zeros(shape, np.uint32), low)


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.stack(_hashed_counters(key, tuple(shape)), axis=-1)


def _fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
    data = jnp.asarray(data, np.uint32)
    bits1, bits2 = threefry2x32(key[0], key[1], jnp.zeros((), np.uint32), data)
    return jnp.stack([bits1, bits2])


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    if bit_width not in (8, 16, 32, 64):
        raise TypeError(f"random bits of width {bit_width}: 8, 16, 32 or 64 only.")
    bits1, bits2 = _hashed_counters(key, tuple(shape))
    if bit_width == 64:
        return (bits1.astype(np.uint64) << np.uint64(32)) | bits2.astype(np.uint64)
    bits = bits1 ^ bits2
    return bits if bit_width == 32 else bits.astype(f"uint{bit_width}")


THREEFRY_UNROLLED = define_prng_impl(
    key_shape=(2,),
    seed=threefry_prng_impl.seed,  # the same key words from a seed (no hash involved)
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="threefry2x32_unrolled",
    tag="fryu",
)
