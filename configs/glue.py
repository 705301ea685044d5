"""A GLUE task with GAML on bert-base-uncased: the hyper-parameters of the GAML authors' released
early-exit BERT code (lr 2e-5, batch 16, 200 warm-up steps, max length 128, no weight decay,
clipping at 1.0). The task is the config's argument:

    python train.py --config configs/glue.py:sst2 --workdir workdirs/sst2
    python train.py --config configs/glue.py:mnli --workdir workdirs/mnli --config.train.method=ml

Tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (read from the hub, or from local files
with --config.data.train_file=... --config.data.validation_file=...).
The exit classifiers' rate (10x the encoder's) is our choice: they start from random weights.
"""

import ml_collections

from configs import default

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def get_config(task: str = "sst2") -> ml_collections.ConfigDict:
    if task not in GLUE:
        raise ValueError(f"configs/glue.py:{task}: unknown GLUE task; choose one of {', '.join(GLUE)}.")
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
    config.train.num_epochs = 3
    config.train.exit_weighting = "layer"  # the authors' weights; uniform was measured on MiniLM only
    config.train.checkpoint_every = 1000
    config.train.log_every = 50
    return config
