"""gaml-jax: GAML-BERT (gradient aligned mutual learning for early-exit BERT) in JAX/Flax."""

from gaml_jax.config import ModelConfig
from gaml_jax.model import MultiExitBert, MultiExitOutput
