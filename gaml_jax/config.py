"""The model's hyper-parameters: one frozen dataclass handed whole to every module."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

# HF config fields we read, with the defaults HF's BertConfig uses when a config.json omits one.
_HF_FIELDS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "classifier_dropout": None,
}

EXIT_POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A multi-exit BERT: HF ``BertConfig`` fields plus where the exits are and how they pool.

    ``exit_layers`` are 1-based layer numbers: exit k reads the output of layer
    ``exit_layers[k]``. ``None`` puts an exit after every layer.

    ``exit_pooling`` is what an exit reads of its layer's output: ``cls``, the [CLS] state (BERT's
    pooler, right for MLM-pretrained BERT), or ``mean``, the mean over the real (unmasked) tokens
    (how sentence-transformers checkpoints were trained). ``exit_pooler_dense`` puts the
    pooler's dense + tanh on that vector; without it the classifier reads the vector itself and
    the model has no pooler parameters.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    # Multi-exit fields.
    num_labels: int = 2  # 1 = regression (STS-B).
    exit_layers: tuple[int, ...] | None = None
    shared_pooler: bool = True  # One pooler for all exits (GAML/PABEE code) or one per exit (DeeBERT).
    exit_pooling: str = "cls"  # "cls" or "mean" (``load_pretrained`` resolves "auto" to one).
    exit_pooler_dense: bool = True  # The pooler's dense + tanh after the pooling.
    dtype: str = "float32"  # Compute dtype; parameters always stay float32.
    # Under 16-bit compute, keep the residual stream in float32: the embeddings' sum, each residual
    # sum and LayerNorm's output (what passes from layer to layer), as torch.autocast does; matrix
    # products still take 16-bit inputs. Off: the stream is in the compute dtype. No effect in float32.
    float32_residual: bool = False
    # The training forward runs the layers as one lax.scan (one compiled layer body) rather than an
    # unrolled loop; the same numbers and parameter tree either way (see MultiExitBert._encode).
    # Off by default: measured on CPU it compiles no faster and steps 7% slower (docs/performance.md).
    scan_layers: bool = False

    def __post_init__(self):
        if self.exit_layers is not None:
            layers = tuple(int(x) for x in self.exit_layers)
            object.__setattr__(self, "exit_layers", layers)
            if not layers or list(layers) != sorted(set(layers)):
                raise ValueError(f"exit_layers must be strictly increasing and non-empty, got {layers}.")
            if layers[0] < 1 or layers[-1] > self.num_hidden_layers:
                raise ValueError(
                    f"exit_layers {layers} must lie in 1..{self.num_hidden_layers} (1-based layer numbers)."
                )
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.exit_pooling not in EXIT_POOLINGS:
            raise ValueError(
                f"exit_pooling must be one of {EXIT_POOLINGS}, got {self.exit_pooling!r} "
                "('auto' is resolved from the checkpoint by load_pretrained)."
            )
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}.")
        if not isinstance(self.float32_residual, bool):
            raise ValueError(f"float32_residual must be True or False, got {self.float32_residual!r}.")
        if not isinstance(self.exit_pooler_dense, bool):
            raise ValueError(f"exit_pooler_dense must be True or False, got {self.exit_pooler_dense!r}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")

    @property
    def exits(self) -> tuple[int, ...]:
        """1-based layer numbers that carry an exit."""
        return self.exit_layers or tuple(range(1, self.num_hidden_layers + 1))

    @property
    def num_exits(self) -> int:
        return len(self.exits)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def residual_dtype(self) -> jnp.dtype:
        """The dtype of the residual stream: float32 with ``float32_residual``, else the compute dtype."""
        return jnp.dtype(jnp.float32) if self.float32_residual else self.compute_dtype

    @property
    def exit_dropout(self) -> float:
        return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
        """Builds a config from a HF ``config.json`` dict (or ``BertConfig.to_dict()``)."""
        fields = {k: hf_config.get(k, default) for k, default in _HF_FIELDS.items()}
        if fields["classifier_dropout"] is None:
            fields.pop("classifier_dropout")
        fields.update(overrides)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"Unknown model config field(s) {sorted(unknown)}.")
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` fields of the encoder (for exporting a checkpoint)."""
        return {k: getattr(self, k) for k in _HF_FIELDS}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
