"""GLUE CoLA with GAML on bert-base-uncased.

python train.py --config configs/cola.py --workdir workdirs/cola
"""

from configs.glue import glue_config


def get_config():
    return glue_config("cola")
