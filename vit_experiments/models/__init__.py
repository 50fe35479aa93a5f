"""Model library: plain torch.nn, no Lightning. ViT here; DeiT and CLIP build on the same VisionTransformer."""

from vit_experiments.models.convert import (
    convert_hf_vit_state_dict,
    load_hf_vit,
    vit_config_from_hf,
)
from vit_experiments.models.layers import Attention, Block, DropPath, Mlp, PatchEmbed
from vit_experiments.models.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed
from vit_experiments.models.vit import VARIANTS, VisionTransformer, ViTConfig, build_vit, parse_variant

__all__ = [
    "VARIANTS",
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "ViTConfig",
    "build_vit",
    "convert_hf_vit_state_dict",
    "load_hf_vit",
    "parse_variant",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
    "vit_config_from_hf",
]
