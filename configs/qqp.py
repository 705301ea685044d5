"""GLUE QQP with GAML on bert-base-uncased.

python train.py --config configs/qqp.py --workdir workdirs/qqp
"""

from configs.glue import glue_config


def get_config():
    return glue_config("qqp")
