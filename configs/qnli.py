"""GLUE QNLI with GAML on bert-base-uncased.

python train.py --config configs/qnli.py --workdir workdirs/qnli
"""

from configs.glue import glue_config


def get_config():
    return glue_config("qnli")
