"""Optimiser and learning-rate schedule shared by every vitx task.

AdamW (Loshchilov & Hutter 2019) with the weight-decay split that ViT and DeiT use: no decay on norms, biases,
position embeddings and special tokens. Linear warm-up then cosine decay, stepped per optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    weight_decay: float = 0.05  # AdamW decoupled decay, applied to matrices only (see param_groups)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500  # linear warm-up from ~0; a ViT without warm-up often diverges early
    min_lr_ratio: float = 0.01  # the cosine ends at lr * min_lr_ratio rather than 0, so late steps still learn

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def param_groups(model: nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> list[dict]:
    """Two groups: decayed matrices, and undecayed 1-D parameters (norms, biases) plus the names in `skip`
    (position embedding, class and distillation tokens, the CLIP temperature)."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int, skip: Iterable[str] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, skip), lr=cfg.lr, betas=cfg.betas)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))  # a short run still reaches the peak
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup, total_steps, cfg.min_lr_ratio)
    )
    return opt, sched
