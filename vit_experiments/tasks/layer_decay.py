"""Layer-wise learning-rate decay for fine-tuning a ViT.

Clark et al. 2020 (ELECTRA) and Bao et al. 2022 (BEiT, Sec. 2.5 and 3): the head trains at the full learning
rate and each block below it at `layer_decay` times the rate of the block above, so the early layers, whose
features transfer best, move least. Layer 0 is the embedding (patch projection, tokens, position embedding),
layers 1..depth are the blocks, depth + 1 the final norm and the heads. 1.0 turns it off.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def vit_layer_id(name: str, depth: int) -> int:
    """Depth of a VisionTransformer parameter: 0 embedding, i + 1 for blocks.i, depth + 1 for the rest."""
    if name.startswith(("patch_embed", "cls_token", "dist_token", "pos_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float, skip: Iterable[str] = ()
) -> list[dict]:
    """AdamW parameter groups per (layer, decayed or not): lr = lr * layer_decay ** (depth + 1 - layer). Norms,
    biases and the names in `skip` get no weight decay, as in `optim.param_groups`."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1] (1 = off; BEiT uses 0.65-0.75), got {layer_decay}")
    depth = model.cfg.depth
    skip = set(skip)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        decayed = not (p.ndim <= 1 or name in skip or name.split(".")[-1] in skip)
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault(
            (layer, decayed),
            {"params": [], "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale, "lr_scale": scale},
        )
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
