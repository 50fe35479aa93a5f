"""Checkpoints: the one module that reads and writes weights, for every family and every entry point.

    info = read_checkpoint("runs/vit-pretrain/version_0/checkpoints/last.ckpt")
    info.family, info.config, info.normalization, info.class_names   # what the file is
    model = info.build()                                               # the network with its weights
    load_weights(other_model, info)                                    # fine-tuning: adapted to other_model

`read_checkpoint` takes a file or a folder (io.load_file says what each kind of file gives a reader) and tries the
registered readers (info.py says what a reader is): vitx's own checkpoints, then the readers of other libraries'
layouts, imported below so that they register, then bare state dicts. A new layout is a module with a reader
registered by `register_reader`, and one import line below.
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
from vit_experiments.checkpoints.io import LoadedDirectory, load_file

# the readers of other libraries' layouts: importing a module registers its readers, in this order
from vit_experiments.checkpoints import timm_vit, hf_vit, big_vision  # noqa: E402,F401  (ViT / DeiT)
from vit_experiments.checkpoints import clip_readers  # noqa: E402,F401  (CLIP: Hugging Face, open_clip, OpenAI)

__all__ = [
    "METADATA_KEY", "CheckpointInfo", "LoadedDirectory", "build_network", "config_from_dict", "family_of", "load_file",
    "load_weights", "network_metadata", "read_checkpoint", "register_reader",
]
