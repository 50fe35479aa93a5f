"""High-norm outlier tokens: patch tokens whose output norm stands far above the layer's typical norm.

Darcet et al. 2024, "Vision Transformers Need Registers" (ICLR): large, well-trained ViTs repurpose a few
low-information patch tokens (often background) as global scratch space; those tokens' outputs have norms many
times the others' (their Fig. 3), and they show up as artefacts in attention maps. Register tokens give the model
somewhere else to keep that information.

Rule used here, per layer, over the patch tokens (prefix tokens excluded) of every image in the batch: with
n_i = ||x_i||_2 the norm of patch token i of the layer's output (the residual stream after the block),
m = median(n) and MAD = median(|n - m|), token i is an outlier when

    n_i > m + k * MAD,    k = 10 by default.

Why median and MAD: the outliers themselves do not move the threshold (a mean and standard deviation would be
dragged up by them). k = 10 MADs is about 6.7 standard deviations of a normal distribution, so a layer whose
norms are merely spread (no outliers) flags practically nothing, while Darcet et al.'s outliers (several times the
median norm) are far beyond it. When MAD is 0 (all norms equal), 1e-6 * m stands in for it so that rounding
noise is not flagged.
"""
from typing import NamedTuple, Sequence

import torch


class OutlierTokens(NamedTuple):
    mask: torch.Tensor  # (B, gh, gw) bool: the patch is an outlier in this layer
    share: torch.Tensor  # () float: share of patch tokens that are outliers
    threshold: torch.Tensor  # () float: the norm above which a token is an outlier
    norm_ratio: torch.Tensor  # () float: largest patch norm / median patch norm


def patch_token_norms(tokens: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """L2 norms of the patch tokens laid out on the grid: (B, T, D) -> (B, gh, gw) float32."""
    gh, gw = int(grid[0]), int(grid[1])
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] != num_prefix_tokens + gh * gw:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be (batch, {num_prefix_tokens} prefix + {gh}x{gw} patches, width); got {shape}")
    norms = tokens[:, num_prefix_tokens:].float().norm(dim=-1)  # (B, N)
    return norms.reshape(-1, gh, gw)  # (B, gh, gw) row-major, as the patches


def outlier_tokens(tokens: torch.Tensor, grid: Sequence[int], num_prefix_tokens: int = 1,
                   k: float = 10.0) -> OutlierTokens:
    """Which patch tokens of one layer's output have an outlier norm (median + k * MAD over the whole batch)."""
    if k <= 0:
        raise ValueError(f"k must be > 0 (MADs above the median), got {k}")
    norms = patch_token_norms(tokens, grid, num_prefix_tokens)  # (B, gh, gw)
    flat = norms.reshape(-1)  # (B * N,)
    med = flat.median()
    mad = (flat - med).abs().median()
    threshold = med + k * torch.maximum(mad, 1e-6 * med.abs())
    mask = norms > threshold  # (B, gh, gw)
    return OutlierTokens(mask, mask.float().mean(), threshold, flat.max() / med.clamp_min(1e-12))


def outliers_by_layer(hidden: Sequence[torch.Tensor], grid: Sequence[int], num_prefix_tokens: int = 1,
                      k: float = 10.0) -> OutlierTokens:
    """outlier_tokens for every layer, stacked: mask (L, B, gh, gw), share / threshold / norm_ratio (L,)."""
    if len(hidden) == 0:
        raise ValueError("no layer outputs given")
    per = [outlier_tokens(h, grid, num_prefix_tokens, k) for h in hidden]
    return OutlierTokens(*(torch.stack(list(x)) for x in zip(*per)))
