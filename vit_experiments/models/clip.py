"""CLIP: an image tower and a text tower trained to agree in one embedding space.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision". Image tower: the
project's VisionTransformer with CLIP's choices (a LayerNorm before the blocks, no bias on the patch
projection), read out at the class token after the final LayerNorm and projected without bias. Text tower:
models/text.py. Both embeddings are L2-normalised; the logits of a batch are exp(t) * I @ T^T with a learnable
temperature t, initialised to ln(1/0.07) and kept at or below ln(100) "to prevent scaling the logits by more
than 100, which we found necessary to prevent training instability" (section 2.5). The loss lives in
vit_experiments/losses.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_experiments.models.text import TextConfig, TextTransformer
from vit_experiments.models.vit import ViTConfig, VisionTransformer


def _clip_vision() -> ViTConfig:
    return ViTConfig(variant="B/16", image_size=224, num_classes=0, pre_norm=True, patch_bias=False, norm_eps=1e-5)


@dataclass
class CLIPConfig:
    """The two towers and the space they share. Defaults: the paper's ViT-B/16 model."""

    embed_dim: int = 512
    """width of the shared embedding space both projections map into (512 for ViT-B/16)"""
    vision: ViTConfig = field(default_factory=_clip_vision)
    """the image tower; CLIP's has pre_norm=True and patch_bias=False. It has no classification head: the projection
    replaces it, so num_classes is set to 0 whatever the config says"""
    text: TextConfig = field(default_factory=TextConfig)
    """the text tower (12 x 512, 8 heads in the paper)"""
    init_logit_scale: float = math.log(1 / 0.07)
    """the temperature's starting value in log space: logits = exp(t) * cosine; 1/0.07 from Wu et al. 2018"""
    max_logit_scale: float = math.log(100.0)
    """the ceiling of t, enforced after every optimizer step: a scale above 100 destabilises training"""

    def __post_init__(self):
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive integer, got {self.embed_dim}")
        if self.vision.num_classes != 0:
            self.vision = dataclasses.replace(self.vision, num_classes=0)
        if self.init_logit_scale > self.max_logit_scale:
            raise ValueError(
                f"init_logit_scale {self.init_logit_scale:.3f} is above max_logit_scale {self.max_logit_scale:.3f}; "
                "start at or below the ceiling"
            )


class CLIP(nn.Module):
    """Images (B, C, H, W) and token ids (B, T) -> L2-normalised embeddings (B, embed_dim) and their logits."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        # `visual` is the plain ViT, so everything that analyses a ViT (attention maps, position embedding) finds it
        self.visual = VisionTransformer(cfg.vision)
        self.image_projection = nn.Linear(cfg.vision.embed_dim, cfg.embed_dim, bias=False)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))  # () log of the logit scale
        nn.init.normal_(self.image_projection.weight, std=cfg.vision.embed_dim**-0.5)

    def no_weight_decay(self) -> set:
        """Parameter names not to decay, besides norms and biases: embeddings, tokens and the temperature."""
        names = {f"visual.{n}" for n in self.visual.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names | {"logit_scale"}

    # ---- scaling hooks: both towers ------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def scaling_units(self) -> list[nn.Module]:
        return self.visual.scaling_units() + self.text.scaling_units()

    def param_layer(self, name: str) -> int:
        """Each tower's own depth (so layer decay treats the towers alike); the projections and temperature on
        top."""
        if name.startswith("visual."):
            return self.visual.param_layer(name[len("visual."):])
        if name.startswith("text.") and not name.startswith("text.text_projection"):
            return self.text.param_layer(name[len("text."):])
        return self.num_layers()

    def num_layers(self) -> int:
        return max(self.visual.num_layers(), self.text.num_layers())

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim), before normalisation: the class token after the ViT's final LayerNorm,
        projected."""
        tokens = self.visual.forward_features(images)  # (B, T, D) after the final LayerNorm
        pooled = self.visual.forward_head(tokens, pre_logits=True)  # (B, D) class token
        return self.image_projection(pooled)  # (B, embed_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image_features(images), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, embed_dim) unit vectors."""
        return F.normalize(self.text(ids), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        """-> (image embeddings (B, E), text embeddings (B, E), log of the logit scale ()). The loss takes these
        three, so that it can gather the embeddings of every device before scoring."""
        return self.encode_image(images), self.encode_text(ids), self.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep the temperature at or below its ceiling; call after every optimizer step. In place, so it also
        works on the shard of the parameter that a sharded (FSDP) model holds."""
        self.logit_scale.clamp_(max=self.cfg.max_logit_scale)
