"""GLUE SST-2 with GAML on bert-base-uncased.

python train.py --config configs/sst2.py --workdir workdirs/sst2
"""

from configs.glue import glue_config


def get_config():
    return glue_config("sst2")
