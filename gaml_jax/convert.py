"""Converts a HF BERT checkpoint, once, into a folder that gaml_jax loads with no torch and no hub.

    python -m gaml_jax.convert bert-base-uncased /data/bert-base-gaml --num-labels 3

DST then holds the params (orbax), the whole ``ModelConfig`` (``gaml_jax_config.json``) and the
tokenizer; pass DST wherever a model name is expected (``load_pretrained(DST)``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gaml_jax.weights import load_pretrained, load_tokenizer, save_converted

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gaml_jax.convert",
        description=__doc__.split("\n\n")[0],
        epilog="SRC may hold model.safetensors or pytorch_model.bin (this one needs torch, here only).",
    )
    parser.add_argument("src", metavar="SRC", help="a HF BERT folder or hub id (e.g. bert-base-uncased)")
    parser.add_argument("dst", metavar="DST", help="the folder to write; it must not exist or be empty")
    parser.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="labels of each exit classifier, 1 = regression (default: SRC's own classifier's, else 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the new exit classifiers (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it holds files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gaml_jax").setLevel(logging.INFO)  # Ours only: orbax logs every step at INFO.

    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.overwrite:
        print(f"error: {dst} exists and is not empty; pass --overwrite to replace it.", file=sys.stderr)
        return 1  # Before the (slow) loading.
    try:
        model, params = load_pretrained(args.src, args.num_labels, seed=args.seed)
        try:
            tokenizer = load_tokenizer(args.src)
        except (OSError, ValueError) as err:
            logger.warning("No tokenizer saved: %s", err)
            tokenizer = None
        save_converted(dst, model.config, params, tokenizer, overwrite=args.overwrite)
    except (OSError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logger.info(
        "Wrote %s: %d layers, %d exits, %d labels%s.",
        dst,
        model.config.num_hidden_layers,
        model.config.num_exits,
        model.config.num_labels,
        "" if tokenizer is not None else ", no tokenizer",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
