"""GLUE MRPC with GAML on bert-base-uncased.

python train.py --config configs/mrpc.py --workdir workdirs/mrpc
"""

from configs.glue import glue_config


def get_config():
    return glue_config("mrpc")
