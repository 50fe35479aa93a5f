"""Attention rollout: which image patches the class token's output draws on, through all layers.

Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"; used for ViT Fig. 12
(Dosovitskiy et al. 2021). Per layer, average the attention over heads, add the identity to account for
the residual connection, and renormalise rows; then multiply the layers' matrices from the first layer
up: R = A_L' ... A_2' A_1'. Row t of R says how much each input token contributes to token t's output.
We return the row of the readout token (the class token, or the distillation token for DeiT's second
head) restricted to the patches and laid out on the patch grid.
"""
from typing import Sequence, Tuple

import torch

GridSize = Tuple[int, int]


def attention_rollout(
    attns: Sequence[torch.Tensor],
    grid: GridSize,
    num_prefix_tokens: int = 1,
    token_index: int = 0,
    head_fusion: str = "mean",
) -> torch.Tensor:
    """Rollout maps of one readout token's attention to the patches -> (B, gh, gw) float32.

    attns: per-layer attention probabilities, each (B, heads, T, T), first layer first.
    token_index: which prefix token to read out (0 = class token; 1 = DeiT's distillation token).
      With no prefix tokens (global-average pooling) the map is the mean over all patch tokens' rows,
      which is what the pooled feature reads.
    head_fusion: "mean" (as in the paper), "max" or "min" over heads.
    The values are the raw rollout weights (they do not sum to 1 over patches: the rest stays on the
    prefix tokens); normalise for display.
    """
    if len(attns) == 0:
        raise ValueError("no attention maps given; call forward_features(x, return_attention=True)")
    gh, gw = grid
    p = num_prefix_tokens
    T = p + gh * gw
    for i, a in enumerate(attns):
        if a.ndim != 4 or a.shape[-1] != T or a.shape[-2] != T:
            raise ValueError(
                f"layer {i} attention has shape {tuple(a.shape)}; grid {gh}x{gw} with {p} prefix token(s) "
                f"needs (batch, heads, {T}, {T})")
    if p > 0 and not 0 <= token_index < p:
        raise ValueError(f"token_index={token_index} but the model has {p} prefix token(s)")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"head_fusion={head_fusion!r}; choose one of {sorted(fuse)}")

    eye = torch.eye(T, device=attns[0].device)  # (T, T)
    rollout = None
    for a in attns:
        a = fuse[head_fusion](a.detach().float()) + eye  # (B, T, T) residual path as identity
        a = a / a.sum(-1, keepdim=True)  # rows are distributions again
        rollout = a if rollout is None else a @ rollout  # (B, T, T) later layers on the left
    if p > 0:
        row = rollout[:, token_index, p:]  # (B, N)
    else:
        row = rollout.mean(1)  # (B, N)
    return row.reshape(-1, gh, gw)
