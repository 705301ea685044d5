"""Early-exit inference on the device: a layer-by-layer runner that really stops.

``EarlyExitRunner`` runs the model layer by layer, asks the host once per exit layer which examples
may leave (a criterion of ``gaml_jax.criteria``), and keeps computing only the others, gathered
into a smaller batch. ``early_exit_program`` is early exit as one device program (a
``lax.while_loop`` over the layers, the criterion on the device): what ``gaml_jax.export`` exports,
and what the runner runs for a single example.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gaml_jax import names
from gaml_jax.criteria import DEFAULT_REGRESSION_TOLERANCE, check_criterion
from gaml_jax.model import MultiExitBert
from gaml_jax.runtime import serving_jit

PyTree = Any

# Batch sizes the runner compiles for; a batch is padded up to the next one. Beyond the largest,
# a batch runs at its own size. Powers of two and 1.5x powers of two (1, 2, 3, 4, 6, 8, 12, ...,
# 512) bound the padding to a third of a batch: at BERT-base shapes, batch 32 and a 2x layer
# speed-up, powers of two alone turned 0.78 of the layer speed-up into wall clock, these 0.88.
# Buckets cost few compilations, since all layers share one compiled function per bucket.
DEFAULT_BATCH_BUCKETS = tuple(sorted({2**i for i in range(10)} | {3 * 2**i for i in range(8)}))
# Whether a runner on the CPU gathers the examples still running with numpy rather than with a
# compiled program (EarlyExitRunner.compacts_on_host). False: on the device, as on accelerators.
COMPACT_ON_HOST = True
# XLA options of the runner's programs under 16-bit compute: every value rounded to its declared
# dtype, so that the per-layer programs compute what the whole model's one program computes.
EXACT_ROUNDING = {"xla_allow_excess_precision": False}


# ----------------------------------------------------------------------------------------------
# Real early exit.
# ----------------------------------------------------------------------------------------------


class ExitResult(NamedTuple):
    logits: np.ndarray  # [batch, labels] float32 logits of the exit each example took
    exit_index: np.ndarray  # [batch] 0-based exit
    layers_run: np.ndarray  # [batch] encoder layers computed for the example


class EarlyExitRunner:
    """Runs a ``MultiExitBert`` layer by layer and stops computing examples once they exit.

    The embedding, a layer without an exit, and a layer fused with its exit are separate jitted
    functions, each compiled once per (batch bucket, sequence length) and shared by all layers
    (they differ only in their weights, which are arguments). At an exit layer
    the exit's logits come to the host (the one host sync of that layer), the criterion decides,
    and the examples still running are gathered, with one gather, into the smallest bucket that
    holds them (padded by repeating a running row), when that bucket is smaller than the current
    one: on the device, or with numpy on the CPU, whose device memory is the host's
    (``compacts_on_host``: no program to compile per pair of buckets).

    A single example (``one_program_at_batch_one``, the default) runs as one device program
    instead: ``early_exit_program``, the exported program's loop, which applies the criterion
    on the device and stops at the example's exit layer with no host round trip per layer
    (MiniLM, 3 of 6 layers, a 2-core CPU: 9.9-11.1 ms against 11.5-12.6 ms layer by layer, in
    the same runs of bench/bench_serving.py).

    Example::

      runner = EarlyExitRunner(model, params)
      result = runner.run(batch, "entropy", 0.3)
      speedup_layers(result.layers_run, model.config.num_hidden_layers)
    """

    def __init__(
        self,
        model: MultiExitBert,
        params: PyTree,
        *,
        batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS,
        one_program_at_batch_one: bool = True,
    ):
        cfg = model.config
        buckets = sorted({int(b) for b in batch_buckets})
        if not buckets or buckets[0] < 1:
            raise ValueError(f"batch_buckets must be positive batch sizes, got {batch_buckets}.")
        self.model, self.config, self.batch_buckets = model, cfg, tuple(buckets)
        params = jax.device_put(params)
        self.params = params
        self._exit_of_layer = {layer - 1: k for k, layer in enumerate(cfg.exits)}  # 0-based layer -> exit
        # Every encoder layer has the same structure, and so has every exit: each is applied as
        # layer 0 (exit 0) with its own weights, so one compiled function serves all layers
        # (exits) of a batch bucket. Each call also flattens only the small pytree it needs.
        self._embed_params = {names.EMBEDDINGS: params[names.EMBEDDINGS]}
        self._layer_params = [{names.layer(0): params[names.layer(i)]} for i in range(cfg.num_hidden_layers)]
        pooler = lambda k: names.pooler(k, cfg.shared_pooler)
        self._exit_params = [
            {names.classifier(0): params[names.classifier(k)]}
            | ({pooler(0): params[pooler(k)]} if cfg.exit_pooler_dense else {})
            for k in range(cfg.num_exits)
        ]

        def embed(p, input_ids, token_type_ids, attention_mask):
            hidden = model.apply({"params": p}, input_ids, token_type_ids, True, method=MultiExitBert.embed)
            return hidden, attention_mask  # brings the mask to the device in the same call

        def layer(p, hidden, attention_mask, queries=None):
            return model.apply(
                {"params": p}, 0, hidden, attention_mask, True, queries, method=MultiExitBert.layer
            )

        def layer_exit(p, exit_p, hidden, attention_mask, queries=None):
            hidden = layer(p, hidden, attention_mask, queries)
            # The mask (compacted with the hidden state) keeps mean pooling to the real tokens.
            logits = model.apply(
                {"params": exit_p}, 0, hidden, attention_mask, True, method=MultiExitBert.exit
            )
            return hidden, logits

        def compact(hidden, attention_mask, rows):
            return hidden[rows], attention_mask[rows]

        def full(p, input_ids, attention_mask, token_type_ids):
            return model.apply({"params": p}, input_ids, attention_mask, token_type_ids, True).logits

        # Under 16-bit compute XLA may skip a rounding to the compute dtype inside one program
        # (xla_allow_excess_precision, on by default) that a chain of per-layer programs must make
        # at their boundaries: on a CPU with native bfloat16 (AVX512_BF16, AMX) the runner's logits
        # then differed from the whole model's by 1-3 bfloat16 steps. Both forms round as declared.
        self._rounding = EXACT_ROUNDING if cfg.dtype != "float32" else {}
        jit = functools.partial(jax.jit, compiler_options=self._rounding or None)
        self._embed = jit(embed)
        # The hidden state is donated: each layer writes its output over its input.
        self._layer = jit(layer, donate_argnums=1)
        self._layer_exit = jit(layer_exit, donate_argnums=2)
        self._cls_only_layer = model.cls_only_layer()  # 1-based, or None
        # The last exit's layer for its [CLS] row only, where that is all the exit reads.
        self._last_layer_exit = jit(functools.partial(layer_exit, queries=1))
        self._compact = jax.jit(compact)
        # On the CPU the device's memory is the host's: the running rows are gathered with numpy,
        # with no program to compile for each (batch bucket, smaller bucket, length) it meets
        # (eval.py's demo met 38, 0.1 s of compiling each). Elsewhere the gather stays on the device.
        self.compacts_on_host = COMPACT_ON_HOST and all(
            d.platform == "cpu" for x in jax.tree.leaves(params) for d in x.devices()
        )
        self._full = jit(full)
        self.one_program_at_batch_one = one_program_at_batch_one
        self._program_leaves, self._program_treedef = jax.tree.flatten(serving_params(model, params))
        self._programs: dict[tuple[str, float], Callable] = {}  # (criterion, tolerance) -> jitted

    def program(self, criterion: str, tolerance: float = DEFAULT_REGRESSION_TOLERANCE) -> Callable:
        """``(input_ids, attention_mask, token_type_ids, threshold) -> (logits, exit layer, layers
        run)``: early exit as one jitted device program (``early_exit_program``) on these weights."""
        key = (criterion, float(tolerance))
        if key not in self._programs:
            program = serving_jit(  # with XLA:CPU's serving options, rounding as declared
                early_exit_program(self.model, criterion, self._program_treedef, tolerance=tolerance),
                compiler_options=self._rounding,
            )
            self._programs[key] = functools.partial(program, self._program_leaves)
        return self._programs[key]

    def bucket(self, n: int) -> int:
        """The batch size ``n`` running examples are padded to."""
        for b in self.batch_buckets:
            if b >= n:
                return b
        return n

    def full_forward(self, batch: Mapping[str, Any]) -> jax.Array:
        """All layers and exits in one fused jit: [exits, batch, labels] logits (the clock baseline)."""
        input_ids, attention_mask, token_type_ids = _inputs(batch)
        return self._full(self.params, input_ids, attention_mask, token_type_ids)

    def run(
        self,
        batch: Mapping[str, Any],
        criterion: str,
        threshold: float,
        *,
        tolerance: float = DEFAULT_REGRESSION_TOLERANCE,
        one_program: bool | None = None,
    ) -> ExitResult:
        """Early-exit inference on ``batch``: ``input_ids`` [batch, seq], optional ``attention_mask``
        and ``token_type_ids``; numpy or JAX arrays. ``one_program`` overrides
        ``one_program_at_batch_one`` for this call."""
        cfg = self.config
        crit, threshold = check_criterion(criterion, threshold, cfg.num_labels)
        input_ids, attention_mask, token_type_ids = _inputs(batch)
        n = input_ids.shape[0]
        if n == 0:
            raise ValueError("run() needs a batch of at least one example.")
        if one_program is None:
            one_program = self.one_program_at_batch_one
        if n == 1 and one_program and self.bucket(1) == 1:
            logits, layer, _ = self.program(criterion, tolerance)(
                input_ids, attention_mask, token_type_ids, np.float32(threshold)
            )
            layers_run = np.asarray(layer, np.int64)
            exit_index = np.searchsorted(np.asarray(cfg.exits), layers_run)  # exits are increasing
            return ExitResult(np.asarray(logits), exit_index, layers_run)
        size = self.bucket(n)
        if size > n:
            pad = np.concatenate([np.arange(n), np.zeros(size - n, np.int64)])  # padding repeats row 0
            input_ids, attention_mask, token_type_ids = (
                input_ids[pad],
                attention_mask[pad],
                token_type_ids[pad],
            )
        hidden, mask = self._embed(self._embed_params, input_ids, token_type_ids, attention_mask)

        logits_out = np.zeros((n, cfg.num_labels), np.float32)
        exit_index = np.zeros(n, np.int64)
        running = np.arange(n)  # examples still running ...
        rows = np.arange(n)  # ... and their rows in the device batch
        state = None
        last_exit = cfg.num_exits - 1
        for i in range(cfg.num_hidden_layers):
            k = self._exit_of_layer.get(i)
            if k is None:
                hidden = self._layer(self._layer_params[i], hidden, mask)
                continue
            if i + 1 == self._cls_only_layer:  # the last exit, which reads the [CLS] row only
                _, logits = self._last_layer_exit(self._layer_params[i], self._exit_params[k], hidden, mask)
            else:
                hidden, logits = self._layer_exit(self._layer_params[i], self._exit_params[k], hidden, mask)
            logits = np.asarray(logits)[rows]  # the host sync of this exit layer
            if k == last_exit:
                exits = np.ones(len(running), bool)
            else:
                exits, state = crit.step(logits, threshold, state, tolerance=tolerance)
            logits_out[running[exits]] = logits[exits]
            exit_index[running[exits]] = k
            if exits.all():
                break
            stay = ~exits
            running, rows = running[stay], rows[stay]
            state = jax.tree.map(lambda a, keep=stay: a[keep], state)
            new_size = self.bucket(len(running))
            if new_size < size:
                gather = np.concatenate([rows, np.full(new_size - len(rows), rows[0])])
                if self.compacts_on_host:
                    hidden, mask = (jax.device_put(np.asarray(x)[gather], x.sharding) for x in (hidden, mask))
                else:
                    hidden, mask = self._compact(hidden, mask, gather)
                rows, size = np.arange(len(running)), new_size
        layers_run = np.asarray(cfg.exits)[exit_index]
        return ExitResult(logits_out, exit_index, layers_run)


# ----------------------------------------------------------------------------------------------
# Early exit as one device program (the exported program; the runner's path at batch size 1).
# ----------------------------------------------------------------------------------------------


def serving_params(model: MultiExitBert, params: PyTree) -> PyTree:
    """The parameters as the program reads them: the embeddings, a list of the layers' trees (none
    past the last exit), and lists of the exits' classifiers (and poolers, where not shared).

    Each layer keeps its own arrays, and the loop picks layer ``i`` with a ``lax.switch`` whose
    branches read them in place: indexing weights stacked [layers, ...] copies the layer's
    weights on every pass (MiniLM at batch 1: three layers 10.4-11.0 ms stacked, 9.2 ms switched).
    """
    cfg = model.config
    exits = range(cfg.num_exits)
    out = {  # the arrays themselves, not copies
        "embeddings": params[names.EMBEDDINGS],
        "layers": [params[names.layer(i)] for i in range(cfg.exits[-1])],
        "classifiers": [params[names.classifier(k)] for k in exits],
    }
    if cfg.exit_pooler_dense and cfg.shared_pooler:
        out["pooler"] = params[names.pooler(0, shared=True)]
    elif cfg.exit_pooler_dense:
        out["poolers"] = [params[names.pooler(k, shared=False)] for k in exits]
    return out


def early_exit_program(model: MultiExitBert, criterion: str, treedef, *, tolerance: float) -> Callable:
    """(param leaves, input_ids, attention_mask, token_type_ids [batch, seq], threshold []) ->
    (logits of the exit each example took [batch, labels] float32, its 1-based layer [batch] int32,
    the layers the batch ran [] int32: the deepest exit layer taken).

    The criteria are those of ``gaml_jax.criteria`` (entropy / confidence / patience), computed
    in float32 on the device.
    """
    cfg = model.config
    num_labels, num_exits = cfg.num_labels, cfg.num_exits
    exit_of_layer = np.full(cfg.exits[-1], -1, np.int32)  # 0-based layer -> its exit, or -1
    for k, layer in enumerate(cfg.exits):
        exit_of_layer[layer - 1] = k
    check_criterion(criterion, 1, num_labels)  # a known criterion that applies to the model
    # Where the exits read [CLS], the last exit's layer runs after the loop, for that row only.
    cls_last = model.cls_only_layer()
    loop_layers = len(exit_of_layer) - (cls_last is not None)

    def decide(logits, k, threshold, previous, count):
        """[batch] exits now, and the patience state (previous prediction, agreeing exits)."""
        log_probs = jax.nn.log_softmax(logits)
        if criterion == "entropy":
            entropy = -(jnp.exp(log_probs) * log_probs).sum(-1) / np.log(num_labels)
            return jnp.minimum(entropy, 1.0) < threshold, previous, count
        if criterion == "confidence":
            return jnp.exp(log_probs.max(-1)) >= threshold, previous, count
        if num_labels == 1:
            prediction = logits[:, 0]
            unchanged = jnp.abs(prediction - previous) < tolerance
        else:
            prediction = logits.argmax(-1).astype(jnp.float32)
            unchanged = prediction == previous
        count = jnp.where(k == 0, 0, jnp.where(unchanged, count + 1, 0))
        return count >= threshold, prediction, count

    def program(leaves, input_ids, attention_mask, token_type_ids, threshold):
        p = jax.tree.unflatten(treedef, leaves)
        hidden = model.apply(
            {"params": {names.EMBEDDINGS: p["embeddings"]}},
            input_ids,
            token_type_ids,
            True,
            method=MultiExitBert.embed,
        )
        batch = input_ids.shape[0]

        def exit_params(k: int):  # exit k's weights, named as exit 0's (the program applies exit 0)
            out = {names.classifier(0): p["classifiers"][k]}
            if "pooler" in p:
                out[names.pooler(0, shared=True)] = p["pooler"]
            elif "poolers" in p:
                out[names.pooler(0, shared=False)] = p["poolers"][k]
            return out

        def apply_layer(j: int, queries: int | None = None) -> Callable:
            params_j = {names.layer(0): p["layers"][j]}
            return lambda h: model.apply(
                {"params": params_j}, 0, h, attention_mask, True, queries, method=MultiExitBert.layer
            )

        def apply_exit(k: int) -> Callable:  # the model's own exit: its pooling, pooler, classifier
            params_k = exit_params(k)
            return lambda h: model.apply(
                {"params": params_k}, 0, h, attention_mask, True, method=MultiExitBert.exit
            )

        layer_branches = [apply_layer(j) for j in range(loop_layers)]
        exit_branches = [apply_exit(k) for k in range(num_exits)]

        def running(state):
            i, _, done, *_ = state
            return (i < loop_layers) & ~done.all()

        def layer(state):
            i, hidden, done, logits_out, layer_out, previous, count = state
            hidden = jax.lax.switch(i, layer_branches, hidden)
            k = jnp.asarray(exit_of_layer)[i]
            logits = jax.lax.switch(jnp.maximum(k, 0), exit_branches, hidden)
            exits, new_previous, new_count = decide(logits, k, threshold, previous, count)
            is_exit = k >= 0
            leaving = is_exit & ~done & (exits | (k == num_exits - 1))  # the deepest exit always answers
            return (
                i + 1,
                hidden,
                done | leaving,
                jnp.where(leaving[:, None], logits, logits_out),
                jnp.where(leaving, i + 1, layer_out),
                jnp.where(is_exit, new_previous, previous),
                jnp.where(is_exit, new_count, count),
            )

        state = (
            jnp.int32(0),
            hidden,
            jnp.zeros(batch, bool),
            jnp.zeros((batch, num_labels), jnp.float32),
            jnp.zeros(batch, jnp.int32),
            jnp.zeros(batch, jnp.float32),
            jnp.zeros(batch, jnp.int32),
        )
        if loop_layers:  # none where the only exit is layer 1's, read at [CLS]
            state = jax.lax.while_loop(running, layer, state)
        layers_run, hidden, done, logits_out, layer_out, _, _ = state
        if cls_last is None:
            return logits_out, layer_out, layers_run

        def last(hidden, done, logits_out, layer_out):
            """The last exit's layer ([CLS] row only) and exit: every example still running takes it."""
            logits = exit_branches[-1](apply_layer(cls_last - 1, queries=1)(hidden))
            return (
                jnp.int32(cls_last),
                jnp.where(done[:, None], logits_out, logits),
                jnp.where(done, layer_out, cls_last),
            )

        def finished(hidden, done, logits_out, layer_out):
            return layers_run, logits_out, layer_out

        layers_run, logits_out, layer_out = jax.lax.cond(
            done.all(), finished, last, hidden, done, logits_out, layer_out
        )
        return logits_out, layer_out, layers_run

    return program


def _inputs(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    input_ids = np.asarray(batch["input_ids"], np.int32)
    attention_mask = batch.get("attention_mask")
    token_type_ids = batch.get("token_type_ids")
    attention_mask = (
        np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    )
    token_type_ids = (
        np.zeros_like(input_ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
    )
    return input_ids, attention_mask, token_type_ids
