"""GLUE STS-B with GAML on bert-base-uncased.

python train.py --config configs/stsb.py --workdir workdirs/stsb
"""

from configs.glue import glue_config


def get_config():
    return glue_config("stsb")
