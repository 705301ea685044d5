"""Exports early exit for serving: one compiled program, the tokenizer and a loader.

    python -m gaml_jax.export workdirs/default exported/ --speedup 2
    python -m gaml_jax.export workdirs/default exported/ --criterion patience --threshold 2

The program (``jax.export``, symbolic batch and sequence length) embeds the tokens, then runs
the encoder layers in a ``lax.while_loop`` (a ``lax.switch`` picks each layer's weights): at each exit
it applies the criterion (baked in) with the threshold (an input; the calibrated one is the
default) and stops as soon as every example of the batch has exited, so at batch size 1 it runs
exactly the layers early exit needs. OUT holds the serialized program, its parameters (npz), the
tokenizer, ``serving.json`` (criterion, threshold, labels, buckets) and ``runtime.py``, the
loader, which imports only jax, numpy, tokenizers and json:

    from gaml_jax.export import load  # no gaml_jax: sys.path.insert(0, "exported"); from runtime import load
    classify = load("exported/")
    classify(["a gripping, funny film"])  # [{"label": "positive", "exit_layer": 3, ...}]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from gaml_jax import names, runtime
from gaml_jax.criteria import CRITERIA, check_criterion
from gaml_jax.model import MultiExitBert
from gaml_jax.runtime import load  # noqa: F401  (the loader: gaml_jax.export.load(OUT))
from gaml_jax.serving import EarlyExitClassifier
from gaml_jax.weights import _atomic_dir

PyTree = Any
FORMAT = 1  # of serving.json


def exit_logits(
    model: MultiExitBert, exit_params: PyTree, hidden: jax.Array, attention_mask: jax.Array
) -> jax.Array:
    """Every exit of the exported program: [batch, seq, hidden] layer output and its [batch, seq]
    mask -> [batch, labels] float32 logits (the model's own exit: ``config.exit_pooling`` of the
    real tokens, the pooler where there is one, the classifier)."""
    return model.apply({"params": exit_params}, 0, hidden, attention_mask, True, method=MultiExitBert.exit)


def serving_params(model: MultiExitBert, params: PyTree) -> PyTree:
    """The parameters as the program reads them: the embeddings, a list of the layers' trees (none
    past the last exit), and lists of the exits' classifiers (and poolers, where not shared).

    Each layer keeps its own arrays, and the loop picks layer ``i`` with a ``lax.switch`` whose
    branches read them in place: indexing weights stacked [layers, ...] copies the layer's
    weights on every pass (MiniLM at batch 1: three layers 10.4-11.0 ms stacked, 9.2 ms switched).
    """
    cfg = model.config
    tree = lambda t: jax.tree.map(np.asarray, t)
    exits = range(cfg.num_exits)
    out = {
        "embeddings": tree(params[names.EMBEDDINGS]),
        "layers": [tree(params[names.layer(i)]) for i in range(cfg.exits[-1])],
        "classifiers": [tree(params[names.classifier(k)]) for k in exits],
    }
    if cfg.exit_pooler_dense and cfg.shared_pooler:
        out["pooler"] = tree(params[names.pooler(0, shared=True)])
    elif cfg.exit_pooler_dense:
        out["poolers"] = [tree(params[names.pooler(k, shared=False)]) for k in exits]
    return out


def early_exit_program(model: MultiExitBert, criterion: str, treedef, *, tolerance: float) -> Callable:
    """(param leaves, input_ids, attention_mask, token_type_ids [batch, seq], threshold []) ->
    (logits of the exit each example took [batch, labels] float32, its 1-based layer [batch] int32,
    the layers the batch ran [] int32: the deepest exit layer taken).

    The criteria are those of ``gaml_jax.early_exit`` (entropy / confidence / patience), computed
    in float32 on the device.
    """
    cfg = model.config
    num_labels, num_exits = cfg.num_labels, cfg.num_exits
    exit_of_layer = np.full(cfg.exits[-1], -1, np.int32)  # 0-based layer -> its exit, or -1
    for k, layer in enumerate(cfg.exits):
        exit_of_layer[layer - 1] = k
    check_criterion(criterion, 1, num_labels)  # a known criterion that applies to the model

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

        def apply_layer(j: int) -> Callable:
            params_j = {names.layer(0): p["layers"][j]}
            return lambda h: model.apply(
                {"params": params_j}, 0, h, attention_mask, True, method=MultiExitBert.layer
            )

        def apply_exit(k: int) -> Callable:
            params_k = exit_params(k)
            return lambda h: exit_logits(model, params_k, h, attention_mask)

        layer_branches = [apply_layer(j) for j in range(len(p["layers"]))]
        exit_branches = [apply_exit(k) for k in range(num_exits)]

        def running(state):
            i, _, done, *_ = state
            return (i < len(exit_of_layer)) & ~done.all()

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
        layers_run, _, _, logits_out, layer_out, _, _ = jax.lax.while_loop(running, layer, state)
        return logits_out, layer_out, layers_run

    return program


def export_classifier(
    classifier: EarlyExitClassifier,
    out: str | Path,
    *,
    platforms: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``classifier`` (model, criterion, threshold, tokenizer, labels) as a serving folder.

    ``platforms``: jax.export platforms ("cpu", "cuda", "tpu"); default the current backend.
    """
    model = classifier.model
    tree = serving_params(model, classifier.runner.params)
    leaves, treedef = jax.tree.flatten(tree)
    program = early_exit_program(model, classifier.criterion, treedef, tolerance=classifier.tolerance)
    batch, seq = export.symbolic_shape("b, s")
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    exported = export.export(jax.jit(program), platforms=platforms)(
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
        tokens,
        tokens,
        tokens,
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    try:
        serialized = exported.serialize()
    except ImportError as e:  # jax.export serialization needs the flatbuffers package
        raise ImportError(f"{e}: pip install flatbuffers") from None
    meta = {
        "format": FORMAT,
        "criterion": classifier.criterion,
        "threshold": float(classifier.threshold),
        "tolerance": classifier.tolerance,
        "label_names": list(classifier.label_names),
        "pair": classifier.pair,
        "text_columns": list(classifier.text_columns),
        "max_length": classifier.max_length,
        "length_buckets": list(classifier.length_buckets),
        "batch_buckets": list(classifier.runner.batch_buckets),
        "pad_id": classifier.pad_id,
        "num_layers": model.config.num_hidden_layers,
        "exit_layers": list(model.config.exits),
        "platforms": list(exported.platforms),
        "step": classifier.step,
    }
    with _atomic_dir(out, overwrite) as tmp:
        (tmp / runtime.PROGRAM_FILE).write_bytes(serialized)
        np.savez(tmp / runtime.PARAMS_FILE, **{f"p{i:04d}": np.asarray(x) for i, x in enumerate(leaves)})
        (tmp / runtime.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        classifier.tokenizer.save(str(tmp / runtime.TOKENIZER_FILE))
        shutil.copyfile(runtime.__file__, tmp / "runtime.py")
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gaml_jax.export", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("workdir", metavar="W", help="a train.py workdir (or a gaml_jax.convert folder)")
    parser.add_argument("out", metavar="OUT", help="the folder to write; it must not exist or be empty")
    parser.add_argument("--criterion", default="entropy", choices=sorted(CRITERIA), help="exit criterion")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--threshold", type=float, help="the criterion's threshold (the program's default)")
    group.add_argument("--speedup", type=float, help="target speed-up in layers: threshold found on dev")
    parser.add_argument("--checkpoint", default="best", choices=["best", "latest"], help="which checkpoint")
    parser.add_argument(
        "--platforms", default=None, help="comma-separated, e.g. cpu,cuda (default: this one)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    args = parser.parse_args(argv)
    threshold = args.threshold
    if args.criterion == "patience" and threshold is not None and threshold.is_integer():
        threshold = int(threshold)
    try:
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it.")
        classifier = EarlyExitClassifier.from_workdir(
            args.workdir,
            criterion=args.criterion,
            threshold=threshold,
            speedup=args.speedup,
            checkpoint=args.checkpoint,
        )
        platforms = args.platforms.split(",") if args.platforms else None
        export_classifier(classifier, out, platforms=platforms, overwrite=args.overwrite)
    except (OSError, ValueError, ImportError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(
        f"Wrote {out}: {args.criterion} threshold {classifier.threshold:.6g}, "
        f"{classifier.config.num_hidden_layers} layers. Load it with gaml_jax.export.load({str(out)!r})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
