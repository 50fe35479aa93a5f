"""Model library: plain torch.nn, no Lightning. ViT here; DeiT and CLIP build on the same VisionTransformer.
Weights of other libraries (timm, Hugging Face, big_vision) are read by vit_experiments.checkpoints."""

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
    "parse_variant",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
]
