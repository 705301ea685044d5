"""A Flax (linen) multi-exit BERT: HF ``BertModel``'s encoder with a classifier after every layer.

Parameter names follow HF's module names (``layer_3/attention/self/query/kernel`` for
``encoder.layer.3.attention.self.query.weight``) so that the weight mapping in
``gaml_jax.weights`` stays mechanical.

Besides the full ``__call__``, the embedding, one layer and one exit can each be applied on
their own (``method=MultiExitBert.embed / .layer / .exit``) so that early-exit inference can
run layer by layer and stop.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from gaml_jax import names
from gaml_jax.compilation import as_runtime_values
from gaml_jax.config import ModelConfig

Array = jax.Array
_SQRT_HALF = 1 / math.sqrt(2)  # a Python float: keeps the input's dtype


def gelu_erf(x: Array) -> Array:
    """HF's "gelu", the exact form, written as HF writes it: ``x * 0.5 * (1 + erf(x / sqrt(2)))``.

    ``jax.nn.gelu(approximate=False)`` computes the same function through ``erfc``, which XLA:CPU
    expands into a slower polynomial: this form made the MiniLM train step 5-10% faster and a
    batch-1 layer 11-21% faster on a 2-core CPU (alternating timings), within 1e-6 of it.
    """
    return x * 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_erf,  # HF "gelu" is the exact erf form.
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_fast": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


# On the CPU, a Dense that widens its input (hidden -> hidden, hidden -> intermediate) computes its
# kernel's gradient from a transposed copy of its input, so that XLA:CPU runs it as a YNNPACK
# product rather than as an Eigen product that contracts over the tokens (_dense_dot_general).
# Measured side by side (bench/bench_vs_torch.py --variants eigen-dw; docs/performance.md).
# False: XLA's own form, as before. Read when a function is traced.
TRANSPOSED_WEIGHT_GRADIENTS = True
# And a Dense that narrows it (the feed-forward's output, intermediate -> hidden), with a kernel of
# at most _NARROWING_MAX_SIZE entries and at least _NARROWING_MIN_WIDTH outputs: its kernel's
# gradient is the product of a transposed copy of the cotangent and the input (YNNPACK's form),
# transposed by a copy (_unfolded_transpose). On a 2-core AVX-512 box XLA's form took 1.033 ±
# 0.014 of the MiniLM float32 CE step's time (eleven runs; GAML's 1.00 ± 0.01), 1.016 of
# BERT-medium's (512 -> 2048, four runs); BERT-base's (768 -> 3072) took 0.95-0.98 of it (two runs),
# where the copies cost more than the product gains, so larger kernels keep XLA's form. Measured
# side by side (bench/bench_vs_torch.py --variants eigen-narrow-dw; docs/performance.md).
# False: XLA's form, as before. Read when a function is traced.
TRANSPOSED_NARROWING_WEIGHT_GRADIENTS = True
_NARROWING_MAX_SIZE = 2**20
_NARROWING_MIN_WIDTH = 64
# With it, that kernel's gradient leaves its last transposition copied in row-major order
# (_unfolded_transpose's row_major_cotangent). Else XLA leaves the transposition in the layout
# (column-major, a bitcast) and fuses it into every consumer: the flat optimizer's two AdamW passes
# over the kernel then read it strided, 1.0-1.6 ms each against 0.3 ms (MiniLM, 32 x 64), and the
# float32 MiniLM CE step took 1.014 ± 0.019 of the time (13 runs; GAML 1.011 ± 0.021, 6 runs).
# Measured side by side (bench/bench_vs_torch.py --variants strided-narrow-dw; docs/performance.md).
# False: as before. Read when a function is traced.
ROW_MAJOR_NARROWING_GRADIENTS = True


def _unfolded_transpose(a: Array, keep: Array, *, row_major_cotangent: bool = False) -> Array:
    """``a.T`` for a 2-D ``a``, copied into an array of its own rather than folded into the product
    that reads it (which XLA:CPU would then run as an Eigen product contracting the tokens).

    A ``lax.cond`` on ``keep`` whose branches are ``a.T`` and ``a.T * 1``, which XLA cannot fold
    into the product across the conditional: the transposition becomes a layout (a bitcast) inside
    it, and a plain copy where the product reads it. ``keep`` must not be a constant, which XLA would
    fold at once; inside a derivative rule it must come from primal values. Either branch is ``a.T``
    exactly, and linear in ``a``.

    With ``row_major_cotangent`` the conditional takes ``a`` flattened, so that in reverse mode its
    transpose returns the cotangent flattened: transposed by a copy inside the conditional, in
    row-major order, where XLA would otherwise leave it column-major and have each of its readers
    (the optimizer's passes) read it strided. The value is the same."""
    shape, one = a.shape, jnp.asarray(1, a.dtype)
    operand = a.reshape(-1) if row_major_cotangent else a  # reshape(shape) is then a no-op
    return jax.lax.cond(keep, lambda f: f.reshape(shape).T, lambda f: f.reshape(shape).T * one, operand)


@jax.custom_jvp
def _dense_dot(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over ``x``'s last axis; its derivative is :func:`_dense_dot_jvp`'s."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_dot_jvp(primals, tangents):
    """The product rule, ``dx @ kernel + x @ dkernel``, with the second term written as
    ``transpose(x).T @ dkernel`` where ``transpose(x)`` is a copy XLA may not fold away (an
    optimisation barrier). Reverse mode transposes this linear map: the kernel's cotangent is then
    ``transpose(x) @ cotangent``, a product whose left operand contracts its last axis, which
    XLA:CPU hands to YNNPACK; JAX's own rule contracts both operands' leading axes (the tokens),
    which XLA:CPU leaves to Eigen's slower kernel. The copy is computed in the forward pass and kept
    for the backward pass in place of ``x``; the gradient is the same sums, added in another order.

    For a narrowing kernel (``in > out``) that copy would be of the wide input. The second term is
    then ``copy(copy(dkernel.T) @ x.T)`` (:func:`_unfolded_transpose`), whose transposition makes
    the kernel's cotangent ``copy(copy(cotangent.T) @ x)``: YNNPACK's form again, the copies those
    of the narrow cotangent and of the kernel-sized product (the latter row-major, for the
    optimizer to read in order: ``ROW_MAJOR_NARROWING_GRADIENTS``)."""
    (x, kernel), (dx, dkernel) = primals, tangents
    y = _dense_dot(x, kernel)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_dense_dot(dx, kernel))
    if not isinstance(dkernel, SymbolicZero):
        rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
        if kernel.shape[0] <= kernel.shape[1]:  # widening
            x_t = jax.lax.optimization_barrier(rows.T)  # [in, tokens]
            terms.append(jax.lax.dot_general(x_t, dkernel, (((0,), (0,)), ((), ()))).reshape(y.shape))
        else:  # narrowing: the kernel's cotangent is then copy(copy(cotangent.T) @ x)
            keep = jnp.isfinite(rows[0, 0])  # from the primal (see _unfolded_transpose)
            dkernel_t = _unfolded_transpose(dkernel, keep, row_major_cotangent=ROW_MAJOR_NARROWING_GRADIENTS)
            y_t = jax.lax.dot_general(dkernel_t, rows, (((1,), (1,)), ((), ())))
            terms.append(_unfolded_transpose(y_t, keep).reshape(y.shape))  # y_t: [out, tokens]
    if not terms:
        return y, jnp.zeros_like(y)
    return y, functools.reduce(jnp.add, terms)


_dense_dot.defjvp(_dense_dot_jvp, symbolic_zeros=True)


# On a CPU with bfloat16 matrix instructions (x86's AMX or AVX512_BF16), a Dense under bfloat16
# compute multiplies its 16-bit inputs into a float32 output with YNNPACK's bfloat16 kernels
# (_dense_dot_bf16); its output stays float32 up to the next product's input. XLA:CPU hands a
# bfloat16 product to YNNPACK only when it yields float32 (a bfloat16 output makes it convert both
# inputs to float32 and multiply those), so without this a bfloat16 step ran slower than a float32
# one. Measured side by side (bench/bench_vs_torch.py --dtype bfloat16 --variants upcast-bf16;
# docs/performance.md). False: XLA's own form. Read when a function is traced.
NATIVE_BF16_PRODUCTS = True
# Narrower products (an exit's classifier) keep XLA's form: XLA rewrites their transposes into
# products YNNPACK does not take, which then cannot run in bfloat16 ("Unsupported element type for
# DotThunk::Execute: BF16 x BF16 = F32", seen for a 2-label classifier's kernel gradient).
_NATIVE_BF16_MIN_WIDTH = 64


# The bfloat16 kernel gradients' transposition (_transposed) as a copy XLA does not fold into the
# product, in a branch of a conditional: 0.84 against 1.13 ms for a 2048 x 384 -> 384 kernel gradient
# on a 2-core AVX-512 box (the product alone 0.42 ms); the MiniLM bfloat16 CE step 1.04x as fast,
# BERT-base's 1.02x. Measured side by side (bench/bench_vs_torch.py --dtype bfloat16 --variants
# eye-transposes; docs/performance.md). False: the transposition as a product by an identity
# matrix, which costs as much as a square kernel's gradient itself. Read when a function is traced.
TRANSPOSES_BY_COPY = True


@functools.cache
def cpu_has_bf16_products() -> bool:
    """True if XLA:CPU multiplies bfloat16 matrices into float32 without converting them first.

    Asked of XLA itself, once per process: it compiles a small such product for the CPU and looks
    for a conversion in the program. XLA decides from the CPU's features (YNNPACK's bfloat16
    kernels); a CPU without them gets the conversions, and this path would only add work there.
    """
    operand = jax.ShapeDtypeStruct((128, 128), jnp.bfloat16)
    product = jax.jit(lambda a, b: _into_float32(a, b, (1, 0)))  # called where the CPU is the backend
    return "convert" not in product.lower(operand, operand).compile().as_text()


def _transposed(a: Array) -> Array:
    """``a.T`` for a 2-D bfloat16 ``a``, as an array of its own that a product can read as it is.

    XLA folds a plain transpose into the product that reads it, which then contracts over its
    operands' leading axis, a form YNNPACK does not take (XLA converts it to float32 and multiplies
    with Eigen); behind an optimisation barrier or a bitcast the product is converted all the same.
    A conditional's result it does not look into: with ``TRANSPOSES_BY_COPY`` the transposition
    is a plain copy in one branch of a ``lax.cond``. The other branch, taken where ``a[0, 0]`` is
    not finite (and the gradient is not finite anyway), and the whole form without
    ``TRANSPOSES_BY_COPY``: the product ``eye @ a.T`` into float32, exact (each sum has one nonzero
    term), in which a non-finite entry makes its whole column NaN (``0 * inf``).
    """

    def by_product(a: Array) -> Array:
        return _into_float32(jnp.eye(a.shape[1], dtype=a.dtype), a, (1, 1)).astype(a.dtype)

    if not TRANSPOSES_BY_COPY:
        return by_product(a)
    return jax.lax.cond(jnp.isfinite(a[0, 0]), lambda a: a.T, by_product, a)


def _into_float32(a: Array, b: Array, contracting: tuple[int, int]) -> Array:
    """The product of 2-D ``a`` and ``b`` over axes ``contracting``, in float32 whatever their type."""
    return jax.lax.dot_general(
        a, b, (((contracting[0],), (contracting[1],)), ((), ())), preferred_element_type=jnp.float32
    )


@jax.custom_vjp
def _dense_dot_bf16(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over ``x``'s last axis: bfloat16 inputs, a float32 output (YNNPACK's form).

    Its gradient (:func:`_dense_dot_bf16_bwd`) is three such products: the cotangent is rounded to
    bfloat16, as a bfloat16 product's cotangent is, and the gradients to bfloat16, the inputs' type.
    Reverse mode only (a custom VJP): forward mode through a bfloat16 model on such a CPU needs
    ``NATIVE_BF16_PRODUCTS = False``.
    """
    rows = _into_float32(x.reshape(-1, x.shape[-1]), kernel, (1, 0))
    return rows.reshape(x.shape[:-1] + kernel.shape[1:])


def _dense_dot_bf16_fwd(x: Array, kernel: Array):
    return _dense_dot_bf16(x, kernel), (x, kernel)


def _dense_dot_bf16_bwd(residuals, cotangent: Array):
    x, kernel = residuals
    width_in, width_out = kernel.shape
    rows = x.reshape(-1, width_in)
    ct = cotangent.reshape(-1, width_out).astype(x.dtype)
    dx = _into_float32(ct, kernel, (1, 1)).astype(x.dtype).reshape(x.shape)
    # kernel' = rows.T @ ct, with the narrower of the two transposed (see _transposed).
    if width_in <= width_out:
        dkernel = _into_float32(_transposed(rows), ct, (1, 0)).astype(kernel.dtype)
    else:
        dkernel = _into_float32(_transposed(ct), rows, (1, 0)).astype(kernel.dtype).T
    return dx, dkernel


_dense_dot_bf16.defvjp(_dense_dot_bf16_fwd, _dense_dot_bf16_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``nn.Dense``'s product: :func:`_dense_dot_bf16` for a bfloat16 Dense on a CPU with bfloat16
    products (``NATIVE_BF16_PRODUCTS``), :func:`_dense_dot` for a widening float32 Dense on the CPU
    (``TRANSPOSED_WEIGHT_GRADIENTS``) and for a narrowing one with at most ``_NARROWING_MAX_SIZE``
    kernel entries and at least ``_NARROWING_MIN_WIDTH`` outputs
    (``TRANSPOSED_NARROWING_WEIGHT_GRADIENTS``), else ``lax.dot_general`` as Flax calls it.

    Off the CPU, GPU and TPU libraries take either layout at full speed, and multiply 16-bit inputs
    natively whatever the output's type.
    """
    (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
    on_cpu = jax.default_backend() == "cpu"
    plain = (
        tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not lhs_batch
        and rhs.ndim == 2
        and precision is None
        and preferred_element_type is None
    )
    if (
        plain
        and NATIVE_BF16_PRODUCTS
        and lhs.dtype == rhs.dtype == jnp.bfloat16
        and min(rhs.shape) >= _NATIVE_BF16_MIN_WIDTH
        and on_cpu
        and cpu_has_bf16_products()
    ):
        return _dense_dot_bf16(lhs, rhs)
    if plain and on_cpu:
        width_in, width_out = rhs.shape
        if width_in <= width_out:
            transposed = TRANSPOSED_WEIGHT_GRADIENTS
        else:
            transposed = (
                TRANSPOSED_NARROWING_WEIGHT_GRADIENTS
                and width_out >= _NARROWING_MIN_WIDTH
                and rhs.size <= _NARROWING_MAX_SIZE
            )
        if transposed:
            return _dense_dot(lhs, rhs)
    return jax.lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
    )


def _dense(config: ModelConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        dot_general=_dense_dot_general,
        name=name,
    )


def _layer_norm(config: ModelConfig, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.residual_dtype, param_dtype=jnp.float32, name=name
    )


def attention_bias(attention_mask: Array, dtype: jnp.dtype) -> Array:
    """[batch, seq] 1/0 mask -> [batch, 1, 1, seq] additive bias, ``finfo.min`` on masked keys (as HF)."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


# When the exits read the [CLS] state and no caller asks for every layer's output, the last layer
# that feeds an exit is computed for the [CLS] row only: its keys and values still come from every
# token, but its query, attention output, feed-forward, dropout and LayerNorm from one row, which
# is all the exit reads (the other rows' outputs have no consumer). The same numbers, the same
# dropout masks (drawn as for the whole layer, then the [CLS] row taken); 14% fewer products in a
# 6-layer MiniLM step, 7% in a 12-layer BERT-base one. Measured side by side
# (bench/bench_vs_torch.py --variants all-rows-last; docs/performance.md). False: every row, as
# HF computes it. Read when a function is traced.
CLS_ONLY_LAST_LAYER = True


def _dropout(rate: float, x: Array, deterministic: bool, full_shape: tuple[int, ...] | None = None) -> Array:
    """``nn.Dropout(rate)(x)`` (called inside a compact module, named as it would be). With
    ``full_shape``, ``x`` is the leading entries of a tensor of that shape (the [CLS] row of a
    layer's output, say) and gets that tensor's mask at those entries: the mask is drawn for
    ``full_shape``, as for the whole tensor, and sliced; XLA computes the sliced entries' bits only."""
    if full_shape is None or tuple(full_shape) == x.shape:
        return nn.Dropout(rate)(x, deterministic=deterministic)
    if deterministic or rate == 0.0:
        return x
    scaled = nn.Dropout(rate)(jnp.ones(full_shape, x.dtype), deterministic=False)
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = scaled[tuple(slice(0, n) for n in x.shape)] != 0
    return jax.lax.select(keep, x / (1.0 - rate), jnp.zeros_like(x))  # nn.Dropout's own arithmetic


@flax.struct.dataclass
class MultiExitOutput:
    logits: Array  # [exits, batch, labels]
    hidden_states: tuple[Array, ...] | None = None  # embeddings, then every layer's output


class BertEmbeddings(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
        cfg = self.config
        embed = functools.partial(
            nn.Embed,
            features=cfg.hidden_size,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=cfg.residual_dtype,
            param_dtype=jnp.float32,
        )
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        # Token types through a one-hot product, as Google's BERT does, not a gather: the gather's
        # gradient is a scatter-add of every token into 2 rows, whose colliding atomic adds took
        # 63 of a 94 ms BERT-base step (batch 128 x 128, bf16) on an H200. The product's gradient
        # is a [types, tokens] x [tokens, hidden] matmul, and its forward is the gather's, exactly
        # (one term per sum; "highest" keeps float32 rows from TF32 rounding on a GPU).
        token_types = embed(cfg.type_vocab_size, name="token_type_embeddings")
        one_hot = jax.nn.one_hot(token_type_ids, cfg.type_vocab_size, dtype=cfg.residual_dtype)
        type_table = token_types.embedding.astype(cfg.residual_dtype)
        hidden = (
            embed(cfg.vocab_size, name="word_embeddings")(input_ids)
            + jnp.einsum("bst,th->bsh", one_hot, type_table, precision=jax.lax.Precision.HIGHEST)
            + embed(cfg.max_position_embeddings, name="position_embeddings")(positions)
        )
        hidden = _layer_norm(cfg)(hidden)
        return nn.Dropout(cfg.hidden_dropout_prob)(hidden, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention; the heads stay in [batch, seq, heads, head_dim] throughout.

    Without attention dropout (inference, or a rate of 0) it is ``jax.nn.dot_product_attention``:
    cuDNN's fused (flash) attention on a CUDA GPU under bfloat16/float16 compute, XLA's form
    elsewhere. That function cannot drop attention probabilities, so training with
    ``attention_probs_dropout_prob > 0`` takes the explicit path: the same maths, then dropout.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, bias: Array, deterministic: bool, queries: int | None = None) -> Array:
        """[batch, seq, hidden] -> [batch, queries, hidden]: the first ``queries`` rows' attention
        over every key (``None``: every row's)."""
        cfg = self.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        batch, seq = hidden.shape[:2]
        rows = seq if queries is None else queries
        q = _dense(cfg, cfg.hidden_size, "query")(hidden[:, :rows]).reshape(batch, rows, heads, head_dim)
        k, v = (
            _dense(cfg, cfg.hidden_size, name)(hidden).reshape(batch, seq, heads, head_dim)
            for name in ("key", "value")
        )
        rate = cfg.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            context = self._fused(q, k, v, bias)
        else:
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype) + bias
            # Softmax in float32 even under bf16 compute: masked keys carry finfo.min.
            probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(cfg.compute_dtype)
            probs = _dropout(rate, probs, False, (batch, heads, seq, seq))
            context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return context.reshape(batch, rows, cfg.hidden_size)

    @staticmethod
    def _fused(q: Array, k: Array, v: Array, bias: Array) -> Array:
        """``jax.nn.dot_product_attention``, asking for cuDNN where it may run (it must be named).

        XLA's form computes the float32 softmax as above. cuDNN wants 16-bit inputs and a bias
        spelled out over the query axis; shapes it refuses (it says so while tracing) go to XLA, and
        so does the [CLS] row's attention of a last layer (one query: a product too small to fuse).
        """
        as_many_queries_as_keys = q.shape[1] == k.shape[1]
        if (
            jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and as_many_queries_as_keys
        ):
            batch, rows = q.shape[:2]
            try:
                full_bias = jnp.broadcast_to(bias, (batch, 1, rows, bias.shape[-1]))
                return jax.nn.dot_product_attention(q, k, v, bias=full_bias, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")


class BertAddNorm(nn.Module):
    """HF's ``BertSelfOutput`` / ``BertOutput``: dense, dropout, residual, LayerNorm."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self, x: Array, residual: Array, deterministic: bool, full_shape: tuple[int, ...] | None = None
    ) -> Array:
        """``full_shape``: the layer output's [batch, seq, hidden] where ``x`` holds its first rows
        only (their dropout mask is then that of the whole output; see :func:`_dropout`)."""
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, "dense")(x)
        x = _dropout(cfg.hidden_dropout_prob, x, deterministic, full_shape)
        return _layer_norm(cfg)(x + residual)


class BertAttention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, bias: Array, deterministic: bool, queries: int | None = None) -> Array:
        context = BertSelfAttention(self.config, name="self")(hidden, bias, deterministic, queries)
        residual = hidden if queries is None else hidden[:, :queries]
        return BertAddNorm(self.config, name="output")(context, residual, deterministic, hidden.shape)


class BertIntermediate(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        cfg = self.config
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"Unsupported hidden_act {cfg.hidden_act!r}; known: {sorted(_ACTIVATIONS)}.")
        return _ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, "dense")(hidden))


class BertLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, hidden: Array, bias: Array, deterministic: bool, queries: int | None = None) -> Array:
        """[batch, seq, hidden] -> the layer's output, [batch, seq, hidden]; with ``queries``, its
        first ``queries`` rows only, [batch, queries, hidden] (the same numbers and dropout masks
        as those rows of the whole output; every row still serves as a key and a value)."""
        attended = BertAttention(self.config, name="attention")(hidden, bias, deterministic, queries)
        inner = BertIntermediate(self.config, name="intermediate")(attended)
        return BertAddNorm(self.config, name="output")(inner, attended, deterministic, hidden.shape)


class BertPooler(nn.Module):
    """HF's pooler: dense + tanh on one [batch, hidden] vector (HF's reads the [CLS] state)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, pooled: Array) -> Array:
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(pooled))


def pool_tokens(hidden: Array, attention_mask: Array, pooling: str) -> Array:
    """[batch, seq, hidden] layer output -> [batch, hidden]: the [CLS] state (``cls``) or the mean
    over the tokens the [batch, seq] mask marks real (``mean``; padding never enters it)."""
    if pooling == "cls":
        return hidden[:, 0]
    # Summed in float32 even under bf16 compute; an all-padding row (never real) divides by 1.
    mask = (attention_mask > 0).astype(jnp.float32)[:, :, None]
    total = jnp.sum(hidden.astype(jnp.float32) * mask, axis=1)
    return (total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)).astype(hidden.dtype)


class MultiExitBert(nn.Module):
    """BERT with an exit (pooling, pooler, dropout, classifier) after each layer in ``config.exits``.

    Parameters: ``embeddings``, ``layer_{i}`` (0-based, as HF), ``pooler`` (shared) or
    ``pooler_{k}`` (one per exit; neither without ``exit_pooler_dense``), and ``classifier_{k}``
    for exit k (names made by ``gaml_jax.names``).
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embeddings = BertEmbeddings(cfg, name=names.EMBEDDINGS)
        self.layers = [BertLayer(cfg, name=names.layer(i)) for i in range(cfg.num_hidden_layers)]
        if cfg.exit_pooler_dense and cfg.shared_pooler:
            self.pooler = BertPooler(cfg, name=names.pooler(0, shared=True))
        elif cfg.exit_pooler_dense:
            self.poolers = [BertPooler(cfg, name=names.pooler(k, shared=False)) for k in range(cfg.num_exits)]
        self.exit_dropout = nn.Dropout(cfg.exit_dropout)
        self.classifiers = [_dense(cfg, cfg.num_labels, names.classifier(k)) for k in range(cfg.num_exits)]

    def embed(
        self, input_ids: Array, token_type_ids: Array | None = None, deterministic: bool = True
    ) -> Array:
        """[batch, seq] ids -> [batch, seq, hidden] embedding output."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        return self.embeddings(input_ids, token_type_ids, deterministic)

    def layer(
        self,
        index: int,
        hidden: Array,
        attention_mask: Array,
        deterministic: bool = True,
        queries: int | None = None,
    ) -> Array:
        """Applies encoder layer ``index`` (0-based) to ``hidden`` under a [batch, seq] 1/0 mask;
        with ``queries``, computes the output's first ``queries`` rows only (see ``BertLayer``)."""
        bias = attention_bias(attention_mask, self.config.compute_dtype)
        return self.layers[index](hidden, bias, deterministic, queries)

    def cls_only_layer(self, output_hidden_states: bool = False) -> int | None:
        """The 1-based layer that :meth:`__call__` computes for the [CLS] row only, or None: the
        last exit's layer, where the exits pool [CLS] (``CLS_ONLY_LAST_LAYER``) and the caller
        does not ask for every layer's output. Layers after it have no consumer."""
        cfg = self.config
        if CLS_ONLY_LAST_LAYER and cfg.exit_pooling == "cls" and not output_hidden_states:
            return cfg.exits[-1]
        return None

    def pool(self, exit_index: int, hidden: Array, attention_mask: Array) -> Array:
        """Exit ``exit_index``'s pooled vector [batch, hidden]: ``config.exit_pooling`` of the
        [batch, seq, hidden] layer output under the [batch, seq] mask, then the pooler's
        dense + tanh (with ``config.exit_pooler_dense``)."""
        cfg = self.config
        pooled = pool_tokens(hidden, attention_mask, cfg.exit_pooling)
        if not cfg.exit_pooler_dense:
            return pooled
        return (self.pooler if cfg.shared_pooler else self.poolers[exit_index])(pooled)

    def exit(
        self, exit_index: int, hidden: Array, attention_mask: Array, deterministic: bool = True
    ) -> Array:
        """Exit ``exit_index``: [batch, seq, hidden] layer output and its [batch, seq] 1/0 mask ->
        [batch, labels] float32 logits."""
        pooled = self.pool(exit_index, hidden, attention_mask)
        pooled = self.exit_dropout(pooled, deterministic=deterministic)
        return self.classifiers[exit_index](pooled).astype(jnp.float32)

    def _encode(self, hidden: Array, bias: Array, deterministic: bool, cls_only: int | None) -> list[Array]:
        """Every layer's output; with ``cls_only`` (a 1-based layer), the layers up to that one,
        the last of them for its [CLS] row only ([batch, 1, hidden]). Each layer is applied as a
        pure function of its own ``layer_{i}`` parameters and its own dropout key (one split of
        the ``dropout`` stream per layer), so the two forms compute the same thing: a Python loop,
        or, in training (``deterministic`` False) with ``config.scan_layers``, one ``lax.scan``
        over the layers' parameters stacked inside the step (the [CLS]-only layer after it). The
        scan compiles one layer body instead of L and keeps the parameter tree per layer
        (checkpoints, weight conversion and the early-exit runner see no difference). Inference
        stays unrolled: stacking copies every layer's weights on each call, which at batch 1 costs
        more than the layers themselves (MiniLM, 1 x 32 tokens, a busy 2-core CPU: 86.9 ms
        scanned against 36.6 ms unrolled), while a training step amortises it."""
        cfg = self.config
        count = cfg.num_hidden_layers
        body = BertLayer(cfg, parent=None)
        per_layer = [self.variables["params"][names.layer(i)] for i in range(count)]
        keys = None
        if not deterministic:
            # Computed once: without the barrier XLA recomputes the chain of hashes that derives a
            # layer's key inside every dropout site's kernel (see gaml_jax.prng).
            keys = jax.lax.optimization_barrier(jax.random.split(self.make_rng("dropout"), count))
            if not cfg.scan_layers:
                # Each layer's key a run-time value rather than a constant slice of ``keys``: the
                # layers' dropout kernels are then identical and compiled once, not once per layer.
                data, impl = jax.random.key_data(keys), jax.random.key_impl(keys)
                rows = as_runtime_values(tuple(data[i] for i in range(count)), data)
                keys = [jax.random.wrap_key_data(row, impl=impl) for row in rows]

        def apply(params, hidden: Array, key: Array | None, queries: int | None = None) -> Array:
            rngs = None if key is None else {"dropout": key}
            return body.apply({"params": params}, hidden, bias, deterministic, queries, rngs=rngs)

        full = count if cls_only is None else cls_only - 1  # the layers computed for every row
        if deterministic or not cfg.scan_layers:
            outputs = []
            for i in range(full):
                hidden = apply(per_layer[i], hidden, None if keys is None else keys[i])
                outputs.append(hidden)
        else:

            def step(hidden: Array, layer: tuple) -> tuple[Array, Array]:
                params, key = layer
                hidden = apply(params, hidden, key)
                return hidden, hidden

            outputs = []
            if full:
                stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer[:full])
                hidden, scanned = jax.lax.scan(step, hidden, (stacked, keys[:full]))
                outputs = list(scanned)
        if cls_only is not None:
            outputs.append(apply(per_layer[full], hidden, None if keys is None else keys[full], queries=1))
        return outputs

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> MultiExitOutput:
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        embedded = hidden = self.embed(input_ids, token_type_ids, deterministic)
        bias = attention_bias(attention_mask, self.config.compute_dtype)
        if self.is_initializing():  # creates the ``layer_{i}`` parameters
            layer_outputs = []
            for layer in self.layers:
                hidden = layer(hidden, bias, deterministic, None)  # every row
                layer_outputs.append(hidden)
        else:
            layer_outputs = self._encode(
                embedded, bias, deterministic, self.cls_only_layer(output_hidden_states)
            )
        exit_of_layer = {layer: k for k, layer in enumerate(self.config.exits)}
        logits = [
            self.exit(exit_of_layer[i + 1], hidden, attention_mask, deterministic)
            for i, hidden in enumerate(layer_outputs)
            if i + 1 in exit_of_layer
        ]
        return MultiExitOutput(
            logits=jnp.stack(logits),
            hidden_states=(embedded, *layer_outputs) if output_hidden_states else None,
        )
