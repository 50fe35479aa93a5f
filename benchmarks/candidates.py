"""The models the throughput benchmark compares: vitx's ViT and CLIP and the reference implementations of the same
configuration (`transformers`, and timm where it is importable), each as a Candidate with its loss, and the
synthetic device-resident batches they train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from vit_experiments.losses import contrastive_loss
from vit_experiments.models.clip import CLIP, CLIPConfig
from vit_experiments.models.text import TextConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer

NUM_CLASSES = 1000
CONTEXT = 77  # CLIP's caption length


@dataclass
class Candidate:
    """One implementation of one model: its module, how a batch becomes a loss, and its measurements."""

    impl: str
    module: torch.nn.Module
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]
    flops_per_step: float = 0.0
    peak_mib: Optional[float] = None
    step_s: list = field(default_factory=list)  # wall-clock seconds per step, one entry per round
    cpu_s: list = field(default_factory=list)  # this process's CPU seconds per step (all threads), per round
    optimizer: Optional[torch.optim.Optimizer] = None


def vit_config(size: str, image_size: int) -> ViTConfig:
    return ViTConfig(variant=size, image_size=image_size, num_classes=NUM_CLASSES)


def classification_loss(forward: Callable) -> Callable:
    return lambda m, batch: F.cross_entropy(forward(m, batch[0]), batch[1])


def vit_candidates(size: str, image_size: int, refs: list[str]) -> list[Callable[[], Candidate]]:
    """Builders of the ViTs of one size: vitx first, then the references."""
    cfg = vit_config(size, image_size)
    out = [lambda: Candidate("vitx", VisionTransformer(cfg), classification_loss(lambda m, x: m(x)))]
    if "transformers" in refs:
        from transformers import ViTConfig as HFViTConfig
        from transformers import ViTForImageClassification

        hf = HFViTConfig(
            hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.mlp_dim, image_size=image_size, patch_size=cfg.patch_size, num_labels=NUM_CLASSES,
            hidden_act="gelu", layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            attn_implementation="sdpa",
        )
        out.append(lambda: Candidate("transformers", ViTForImageClassification(hf),
                                     classification_loss(lambda m, x: m(pixel_values=x).logits)))
    if "timm" in refs:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        timm_kwargs = dict(img_size=image_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                           num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.embed_dim, num_classes=NUM_CLASSES)
        out.append(lambda: Candidate("timm", TimmViT(**timm_kwargs), classification_loss(lambda m, x: m(x))))
    return out


def clip_config(size: str, image_size: int) -> CLIPConfig:
    vision = ViTConfig(variant=size, image_size=image_size, num_classes=0, pre_norm=True, patch_bias=False,
                       norm_eps=1e-5)
    return CLIPConfig(embed_dim=512, vision=vision, text=TextConfig(context_length=CONTEXT))


def clip_candidates(size: str, image_size: int, refs: list[str]) -> list[Callable[[], Candidate]]:
    cfg = clip_config(size, image_size)

    def vitx_loss(m, batch):
        return contrastive_loss(*m(batch[0], batch[1]), gather=False)

    out = [lambda: Candidate("vitx", CLIP(cfg), vitx_loss)]
    if "transformers" in refs:
        from transformers import CLIPConfig as HFCLIPConfig
        from transformers import CLIPModel

        v, t = cfg.vision, cfg.text
        hf = HFCLIPConfig(
            vision_config=dict(hidden_size=v.embed_dim, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                               num_attention_heads=v.num_heads, image_size=image_size, patch_size=v.patch_size,
                               hidden_act="gelu"),
            text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                             num_hidden_layers=t.depth, num_attention_heads=t.num_heads,
                             max_position_embeddings=t.context_length, hidden_act="gelu",
                             eos_token_id=t.eot_token_id),
            projection_dim=cfg.embed_dim, attn_implementation="sdpa",
        )

        def hf_loss(m, batch):
            o = m(pixel_values=batch[0], input_ids=batch[1])
            return contrastive_loss(o.image_embeds, o.text_embeds, m.logit_scale, gather=False)

        out.append(lambda: Candidate("transformers", CLIPModel(hf), hf_loss))
    return out


def make_batches(family: str, n: int, batch_size: int, image_size: int, device: torch.device) -> list[tuple]:
    """`n` fixed batches on the device: normalised images (B, 3, S, S) and labels (B,), or token ids (B, 77)
    ending in the end-of-text token for CLIP."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        if family == "clip":
            ids = torch.randint(3, 49408, (batch_size, CONTEXT), generator=g)
            ids[:, 0], ids[:, -1] = 1, 2  # start and end of text
            second = ids
        else:
            second = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        batches.append((images.to(device), second.to(device)))
    return batches


# -- measuring ------------------------------------------------------------------------------------------------
