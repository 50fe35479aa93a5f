"""Mean attention distance: how far, in pixels, each attention head looks.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
Fig. 11 and Appendix D.7: "the average distance in the image space across which information is
integrated, based on the attention weights" -- the analogue of a CNN's receptive-field size.

Definition used here, for attention probabilities A of shape (B, heads, T, T) whose first p tokens are
special (class / distillation / register tokens) and whose remaining N = gh * gw tokens are patches in
row-major order:
  1. keep only patch queries and patch keys, and renormalise each query's row over the patch keys;
  2. per query, take the expected Euclidean distance between its patch centre and the attended patch
     centres, in pixels;
  3. average over queries and over the batch -> one number per head.
Beside it we report the share of attention the patch queries give to the special tokens, which step 1
throws away (a head that mostly reads the class token has a meaningless spatial distance).
"""
from typing import NamedTuple, Sequence, Tuple, Union

import torch

GridSize = Tuple[int, int]
PatchSize = Union[int, Tuple[int, int]]


class AttentionDistance(NamedTuple):
    distance: torch.Tensor  # (heads,) or (layers, heads): mean attention distance in pixels
    prefix_share: torch.Tensor  # same shape: share of patch queries' attention on the prefix tokens


def _pair(x: PatchSize) -> Tuple[int, int]:
    if isinstance(x, int):
        return x, x
    ph, pw = x
    return int(ph), int(pw)


def patch_centres(grid: GridSize, patch_size: PatchSize, device=None) -> torch.Tensor:
    """Pixel coordinates (y, x) of the centre of every patch, row-major -> (gh * gw, 2) float32."""
    gh, gw = grid
    ph, pw = _pair(patch_size)
    ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) * ph  # (gh,)
    xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) * pw  # (gw,)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")  # (gh, gw) each
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)  # (N, 2)


def patch_distances(grid: GridSize, patch_size: PatchSize, device=None) -> torch.Tensor:
    """Euclidean distance in pixels between every pair of patch centres -> (N, N) float32."""
    c = patch_centres(grid, patch_size, device)  # (N, 2)
    return torch.cdist(c[None], c[None])[0]  # (N, N)


def _check_attention(attn: torch.Tensor, grid: GridSize, num_prefix_tokens: int) -> None:
    if not isinstance(attn, torch.Tensor) or attn.ndim != 4:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attention must be a tensor of shape (batch, heads, T, T); got {shape}")
    gh, gw = grid
    T = num_prefix_tokens + gh * gw
    if attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != T:
        raise ValueError(
            f"attention has shape {tuple(attn.shape)} but grid {gh}x{gw} with {num_prefix_tokens} prefix "
            f"token(s) needs T = {T}; pass the model's grid size (image_size // patch_size) and its number "
            f"of class/distillation/register tokens")


def mean_attention_distance(
    attn: torch.Tensor, grid: GridSize, patch_size: PatchSize, num_prefix_tokens: int = 1
) -> AttentionDistance:
    """Mean attention distance per head (pixels) and prefix share per head, each (heads,) float32.

    attn: (B, heads, T, T) attention probabilities (rows sum to 1), any float dtype; computed in float32.
    A patch query that gives no attention at all to patches has no defined distance and is left out of
    the mean; a head where that holds for every query gets NaN.
    """
    _check_attention(attn, grid, num_prefix_tokens)
    p = num_prefix_tokens
    a = attn.detach().float()[:, :, p:, :]  # (B, heads, N, T) rows of the patch queries
    total = a.sum(-1)  # (B, heads, N), 1 for softmax rows; divided out so unnormalised input also works
    prefix_share = a[..., :p].sum(-1) / total.clamp_min(1e-12)  # (B, heads, N)
    patch_attn = a[..., p:]  # (B, heads, N, N)
    mass = patch_attn.sum(-1)  # (B, heads, N)
    dist = patch_distances(grid, patch_size, device=a.device)  # (N, N)
    # expected distance under the row renormalised over the patch keys
    expected = torch.einsum("bhqk,qk->bhq", patch_attn, dist) / mass.clamp_min(1e-12)  # (B, heads, N)
    valid = (mass > 0).float()  # (B, heads, N)
    distance = (expected * valid).sum((0, 2)) / valid.sum((0, 2))  # (heads,); 0/0 -> NaN on purpose
    return AttentionDistance(distance, prefix_share.mean((0, 2)))


def attention_distance_by_layer(
    attns: Sequence[torch.Tensor], grid: GridSize, patch_size: PatchSize, num_prefix_tokens: int = 1
) -> AttentionDistance:
    """mean_attention_distance for each layer's attention -> fields of shape (layers, heads)."""
    if len(attns) == 0:
        raise ValueError("no attention maps given; call forward_features(x, return_attention=True)")
    per_layer = [mean_attention_distance(a, grid, patch_size, num_prefix_tokens) for a in attns]
    if len({r.distance.shape for r in per_layer}) != 1:
        raise ValueError("all layers must have the same number of heads to stack them into (layers, heads)")
    return AttentionDistance(
        torch.stack([r.distance for r in per_layer]),  # (layers, heads)
        torch.stack([r.prefix_share for r in per_layer]),  # (layers, heads)
    )
