"""Parameter names of the multi-exit BERT, made and read in one place.

The top level of the parameter tree is ``embeddings``, ``layer_{i}`` (0-based, as HF), ``pooler``
(shared by all exits) or ``pooler_{k}`` (one per exit), and ``classifier_{k}`` for exit k. Below
that, names follow HF's module names, so that a parameter and its HF tensor differ only by the
prefix and the leaf: ``HF_PREFIXES`` and ``HF_LEAVES`` are the one table read in both directions by
:func:`to_hf` and :func:`from_hf`.
"""

from __future__ import annotations

EMBEDDINGS = "embeddings"
SHARED_POOLER = "pooler"

# Our top-level kind -> the HF module prefix (of ``BertModel``; ``BertFor*`` adds ``bert.`` to all
# but the classifier). ``{}`` is the layer number.
HF_PREFIXES = {
    "embeddings": "embeddings",
    "layer": "encoder.layer.{}",
    "pooler": "pooler",
    "classifier": "classifier",
}
# Our leaf -> HF's. Dense kernels are HF Linear weights transposed.
HF_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Older HF checkpoints name LayerNorm parameters as TensorFlow did.
_HF_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}


def layer(index: int) -> str:
    """Encoder layer ``index`` (0-based)."""
    return f"layer_{index}"


def pooler(exit_index: int, shared: bool) -> str:
    """The pooler exit ``exit_index`` reads through."""
    return SHARED_POOLER if shared else f"pooler_{exit_index}"


def classifier(exit_index: int) -> str:
    """Exit ``exit_index``'s classifier."""
    return f"classifier_{exit_index}"


def parse(head: str) -> tuple[str, int | None]:
    """A top-level name -> (kind, index): ``layer_3`` -> ("layer", 3), ``pooler`` -> ("pooler", None).

    Kinds are those of ``HF_PREFIXES``; the index is the layer or exit, None where there is none.
    """
    if head in (EMBEDDINGS, SHARED_POOLER):
        return head, None
    kind, _, index = head.rpartition("_")
    if kind in ("layer", "pooler", "classifier") and index.isdigit():
        return kind, int(index)
    raise ValueError(f"{head!r} is not a MultiExitBert parameter name.")


def is_exit_head(head: str) -> bool:
    """Whether a top-level name is an exit's own head (a pooler or classifier)."""
    return parse(head)[0] in ("pooler", "classifier")


def is_classifier(head: str) -> bool:
    return head.startswith("classifier_")


def to_hf(kind: str, index: int | None, modules: tuple[str, ...], leaf: str) -> tuple[str, bool]:
    """Our (kind, index, inner modules, leaf) -> (HF tensor name in ``BertModel``, transposed)."""
    prefix = HF_PREFIXES[kind].format(index)
    return ".".join([prefix, *modules, HF_LEAVES[leaf]]), leaf == "kernel"


def from_hf(name: str) -> tuple[str, int | None, tuple[str, ...], str, bool] | None:
    """A ``BertModel`` tensor name -> (kind, index, inner modules, our leaf, transposed), or None.

    ``encoder.layer.3.output.dense.weight`` -> ("layer", 3, ("output", "dense"), "kernel", True).
    A classifier or pooler has no index here: HF models have one of each.
    """
    parts = name.split(".")
    *modules, hf_leaf = parts
    for kind, prefix in HF_PREFIXES.items():
        head = prefix.split(".")
        if kind == "layer":
            if len(modules) < 3 or modules[:2] != head[:2] or not modules[2].isdigit():
                continue
            index, inner = int(modules[2]), tuple(modules[3:])
        elif modules[: len(head)] == head:
            index, inner = None, tuple(modules[len(head) :])
        else:
            continue
        if kind == "classifier" and inner:
            return None  # e.g. a two-layer head: not a BertForSequenceClassification classifier
        last = inner[-1] if inner else kind
        if last == "LayerNorm":
            leaf = {"weight": "scale", "bias": "bias"}.get(_HF_LEGACY_LEAVES.get(hf_leaf, hf_leaf))
        elif last.endswith("_embeddings"):
            leaf = "embedding" if hf_leaf == "weight" else None
        else:
            leaf = {"weight": "kernel", "bias": "bias"}.get(hf_leaf)
        if leaf is None:
            return None
        return kind, index, inner, leaf, leaf == "kernel"
    return None
