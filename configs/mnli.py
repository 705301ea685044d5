"""GLUE MNLI with GAML on bert-base-uncased.

python train.py --config configs/mnli.py --workdir workdirs/mnli
"""

from configs.glue import glue_config


def get_config():
    return glue_config("mnli")
