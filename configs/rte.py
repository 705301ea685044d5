"""GLUE RTE with GAML on bert-base-uncased.

python train.py --config configs/rte.py --workdir workdirs/rte
"""

from configs.glue import glue_config


def get_config():
    return glue_config("rte")
