"""Optimiser and learning-rate schedule shared by every vitx task.

AdamW (Loshchilov & Hutter 2019) with the weight-decay split that ViT and DeiT use: no decay on norms, biases,
position embeddings and special tokens (the network's `no_weight_decay()`). Linear warm-up then cosine decay,
stepped per optimiser step. Optionally layer-wise learning-rate decay for fine-tuning (Clark et al. 2020, ELECTRA;
Bao et al. 2022, BEiT Sec. 2.5): the top trains at the full rate and each layer below at `layer_decay` times the
rate of the layer above, so the early layers, whose features transfer best, move least. Layers are numbered by
the network's `param_layer(name)`, from 0 (embedding) to `num_layers()` (final norm and heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """peak learning rate, reached at the end of warm-up"""
    weight_decay: float = 0.05
    """AdamW decoupled decay, applied to matrices only (see param_groups)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decays; CLIP uses beta2 0.98 for stability at large batch"""
    warmup_steps: int = 500
    """linear warm-up from ~0; a ViT without warm-up often diverges early"""
    min_lr_ratio: float = 0.01
    """the cosine ends at lr * min_lr_ratio rather than 0, so late steps still learn"""
    layer_decay: float = 1.0
    """layer-wise lr decay for fine-tuning: 1.0 = off; BEiT uses 0.65-0.75"""
    fused: Optional[bool] = None
    """AdamW's fused kernel (one launch for all parameters instead of several per tensor); None = on CUDA"""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")


def _decayed(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    return not (p.ndim <= 1 or name in skip or name.split(".")[-1] in skip)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups: per (layer, decayed or not) with `lr_scale = layer_decay ** (top - layer)`, or just
    (decayed, not decayed) when layer_decay is 1. 1-D parameters (norms, biases) and the network's
    `no_weight_decay()` names get no weight decay."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay != 1.0 and not hasattr(model, "param_layer"):
        raise ValueError(f"layer_decay needs a network that numbers its layers (param_layer); "
                         f"{type(model).__name__} does not: set optim.layer_decay 1.0")
    top = model.num_layers() if layer_decay != 1.0 else 0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = model.param_layer(name) if layer_decay != 1.0 else 0
        decayed = _decayed(name, p, skip)
        scale = layer_decay ** (top - layer)
        group = groups.setdefault((layer, decayed), {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                                     "lr_scale": scale})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_implementation(model: nn.Module, fused: Optional[bool]) -> dict:
    """AdamW's `fused` argument: by default the fused kernel where every parameter is on a CUDA device (the
    per-tensor kernels of the default implementation cost a launch each, which shows in the step time of a small
    model on a GPU), torch's default elsewhere. Decided when the optimiser is built, after the model has moved."""
    if fused is None:
        return {"fused": True} if {p.device.type for p in model.parameters()} == {"cuda"} else {}
    return {"fused": bool(fused)}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` and the warm-up + cosine schedule; each group's lr is cfg.lr * its lr_scale."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **adamw_implementation(model, cfg.fused))
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))  # a short run still reaches the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio)
    )
    return opt, sched
