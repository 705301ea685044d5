"""gaml-jax: GAML-BERT (gradient aligned mutual learning for early-exit BERT) in JAX/Flax."""

from gaml_jax.alignment import GradientAlignmentState, alignment_diagnostics, gradient_alignment
from gaml_jax.config import ModelConfig
from gaml_jax.losses import ce_loss, exit_weights, mutual_learning_loss, per_exit_ce
from gaml_jax.model import MultiExitBert, MultiExitOutput
from gaml_jax.weights import load_pretrained, load_tokenizer, save_converted, save_hf

__all__ = [
    "EarlyExitClassifier",
    "GradientAlignmentState",
    "ModelConfig",
    "MultiExitBert",
    "MultiExitOutput",
    "Prediction",
    "alignment_diagnostics",
    "ce_loss",
    "exit_weights",
    "gradient_alignment",
    "load_pretrained",
    "load_tokenizer",
    "mutual_learning_loss",
    "per_exit_ce",
    "save_converted",
    "save_hf",
]


def __getattr__(name: str):
    # The serving API reads data files (datasets, ...): imported on first use, not with gaml_jax.
    if name in ("EarlyExitClassifier", "Prediction"):
        from gaml_jax import serving

        return getattr(serving, name)
    raise AttributeError(f"module 'gaml_jax' has no attribute {name!r}")
