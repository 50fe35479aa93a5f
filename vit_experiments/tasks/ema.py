"""An exponential moving average of the weights, evaluated beside the raw weights.

Polyak & Juditsky 1992; DeiT (Touvron et al. 2021) keeps one with decay 0.99996 per optimiser step. The averaging
is torch's `AveragedModel`; this file only adds the optional warm-up of the decay used by many code bases,
decay_n = min(decay, (1 + n) / (10 + n)) at the n-th update, so that a short run's average is not dominated by
the random initialisation (with 0.99996 the initial weights keep a weight of 0.99996^n: still 96% after 1000
steps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def ema_decay_at(decay: float, num_updates: int, warmup: bool) -> float:
    """The decay used at update number `num_updates` (1 for the first average after the initial copy)."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def ema_multi_avg_fn(decay: float, warmup: bool = False):
    """`multi_avg_fn` for AveragedModel: ema <- d * ema + (1 - d) * current, d = ema_decay_at(decay, n, warmup)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(ema_params, current_params, num_averaged):
        d = ema_decay_at(decay, int(num_averaged), warmup=True)
        torch._foreach_lerp_(ema_params, current_params, 1.0 - d)

    return update


def build_ema(model: nn.Module, decay: float, warmup: bool = False) -> AveragedModel:
    """A frozen copy of `model` that `update_parameters(model)` moves towards `model` after each optimiser step.
    Buffers (BatchNorm statistics) are averaged too."""
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay, warmup), use_buffers=True)
    ema.requires_grad_(False)
    return ema
