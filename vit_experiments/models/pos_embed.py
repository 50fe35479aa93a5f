"""Position embeddings for patch grids.

- resample_abs_pos_embed: fine-tune at a new resolution with the patch size kept, by 2-D interpolation of the
  learned embedding over the patch grid (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Sec. 3.2).
- sincos_2d_pos_embed: the fixed 2-D sine-cosine embedding (Vaswani et al. 2017's 1-D embedding applied to each
  axis, as in Chen et al. 2021 "An Empirical Study of Training Self-Supervised ViTs" and big_vision).
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _as_grid(grid, name: str) -> Tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    if len(grid) != 2:
        raise ValueError(f"{name} must be an int or a (rows, cols) pair, got {grid!r}")
    return int(grid[0]), int(grid[1])


def resample_abs_pos_embed(
    posemb: torch.Tensor,
    new_grid: Sequence[int],
    old_grid: Optional[Sequence[int]] = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resample a (1, prefix + gh*gw, D) position embedding to a new (gh', gw') patch grid.

    Prefix tokens (class, distillation) have no position on the grid and are kept as they are. The patch part is
    interpolated as a D-channel image. old_grid defaults to a square grid. When the grid is unchanged the input is
    returned itself, so the values are exactly the input's.
    """
    new_grid = _as_grid(new_grid, "new_grid")
    n_patch = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(n_patch**0.5))
        if side * side != n_patch:
            raise ValueError(
                f"cannot infer the grid of a position embedding with {n_patch} patch tokens (not a square); "
                "pass old_grid=(rows, cols)"
            )
        old_grid = (side, side)
    old_grid = _as_grid(old_grid, "old_grid")
    if posemb.ndim != 3 or old_grid[0] * old_grid[1] != n_patch:
        raise ValueError(
            f"position embedding of shape {tuple(posemb.shape)} does not hold {num_prefix_tokens} prefix tokens plus "
            f"a {old_grid[0]}x{old_grid[1]} grid; check old_grid and num_prefix_tokens"
        )
    if new_grid == old_grid:
        return posemb
    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]  # (1, p, D), (1, gh*gw, D)
    D = posemb.shape[-1]
    img = patches.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    img = F.interpolate(  # in float32: bicubic is not implemented for every low precision dtype
        img.float(), size=new_grid, mode=interpolation, antialias=antialias,
        align_corners=False if interpolation in ("bilinear", "bicubic") else None,
    )  # (1, D, gh', gw')
    patches = img.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(posemb.dtype)  # (1, gh'*gw', D)
    return torch.cat([prefix, patches], dim=1)  # (1, p + gh'*gw', D)


def sincos_2d_pos_embed(
    embed_dim: int, grid: Sequence[int], num_prefix_tokens: int = 0, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding, shape (1, prefix + gh*gw, D), zeros for the prefix tokens.

    For the patch at (row i, col j) the channels are [sin(j w), cos(j w), sin(i w), cos(i w)] with
    w_k = temperature^(-k / (D/4)), k = 0..D/4-1; patches in row-major order as PatchEmbed emits them.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    gh, gw = _as_grid(grid, "grid")
    quarter = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )  # each (gh, gw)
    y = rows.reshape(-1, 1) * omega  # (gh*gw, D/4)
    x = cols.reshape(-1, 1) * omega  # (gh*gw, D/4)
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (gh*gw, D)
    pe = torch.cat([torch.zeros(num_prefix_tokens, embed_dim), pe], dim=0)  # (p + gh*gw, D)
    return pe.unsqueeze(0)  # (1, p + gh*gw, D)
