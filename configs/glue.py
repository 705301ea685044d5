"""Shared GLUE settings: BERT-base, the hyper-parameters of the GAML authors' released early-exit
BERT code (lr 2e-5, batch 16, 200 warm-up steps, max length 128, no weight decay, clipping at 1.0).

Not run directly: each task file (configs/sst2.py, ...) calls ``glue_config(task)``.
The exit classifiers' rate (10x the encoder's) is our choice: they start from random weights.
"""

import ml_collections

from configs import default


def glue_config(task: str, num_epochs: int = 3) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.name = "bert-base-uncased"
    config.data.task = task
    config.data.max_length = 128
    config.data.length_buckets = (32, 64, 128)
    config.train.learning_rate = 2e-5
    config.train.exit_learning_rate = 2e-4
    config.train.batch_size = 16
    config.train.eval_batch_size = 64
    config.train.warmup_steps = 200
    config.train.weight_decay = 0.0
    config.train.grad_clip_norm = 1.0
    config.train.num_epochs = num_epochs
    config.train.checkpoint_every = 1000
    config.train.log_every = 50
    return config
