"""Checkpoints: the one module that reads and writes weights, for every family and every entry point.

    info = read_checkpoint("runs/vit-pretrain/version_0/checkpoints/last.ckpt")
    info.family, info.config, info.normalization, info.class_names   # what the file is
    model = info.build()                                               # the network with its weights
    load_weights(other_model, info)                                    # fine-tuning: adapted to other_model
"""

from vit_experiments.checkpoints.adapt import load_weights
from vit_experiments.checkpoints.info import (
    METADATA_KEY,
    CheckpointInfo,
    build_network,
    config_from_dict,
    family_of,
    network_metadata,
    read_checkpoint,
    register_reader,
)
from vit_experiments.checkpoints.io import load_file

__all__ = [
    "METADATA_KEY", "CheckpointInfo", "build_network", "config_from_dict", "family_of", "load_file",
    "load_weights", "network_metadata", "read_checkpoint", "register_reader",
]
