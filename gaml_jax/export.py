"""Exports early exit for serving: one compiled program, the tokenizer and a loader.

    python -m gaml_jax.export workdirs/default exported/ --speedup 2
    python -m gaml_jax.export workdirs/default exported/ --criterion patience --threshold 2

The program (``jax.export``, symbolic batch and sequence length) embeds the tokens, then runs
the encoder layers in a ``lax.while_loop`` (a ``lax.switch`` picks each layer's weights): at each
exit it applies the criterion (baked in) with the threshold (an input; the calibrated one is the
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from gaml_jax import runtime
from gaml_jax.criteria import CRITERIA
from gaml_jax.early_exit import early_exit_program, serving_params
from gaml_jax.runtime import load  # noqa: F401  (the loader: gaml_jax.export.load(OUT))
from gaml_jax.serving import EarlyExitClassifier
from gaml_jax.weights import _atomic_dir

PyTree = Any
FORMAT = 2  # of serving.json (2: single_length_multiple)


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
        "single_length_multiple": classifier.single_length_multiple,
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
