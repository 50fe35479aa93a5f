"""Position-embedding similarity: has a 1-D learned position embedding discovered the 2-D image grid?

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 9: the cosine similarity between the
position embedding of each patch and those of all other patches, drawn as a gh x gw grid of gh x gw
tiles. Closer patches have more similar embeddings when the model has learned the topology; row and
column structure appears as stripes.

To follow that during training with one number we use a topology score: the Pearson correlation,
across ordered pairs of distinct patches, between cosine similarity and negative Euclidean grid distance.
It is near 1 for a smooth 2-D embedding (e.g. 2-D sin-cos) and near 0 for a random one.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

GridSize = Tuple[int, int]


def position_similarity(pos_embed: torch.Tensor, grid: GridSize, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity of patch position embeddings -> (gh, gw, gh, gw) float32.

    pos_embed: (1, T, D) as stored by the ViT, or (T, D), with T = num_prefix_tokens + gh * gw.
    sim[i, j, k, l] is the similarity between the patch at row i, column j and the patch at row k, column l.
    """
    pe = pos_embed.detach()
    if pe.ndim == 3:
        if pe.shape[0] != 1:
            raise ValueError(f"pos_embed of shape {tuple(pe.shape)}: expected (1, T, D) or (T, D)")
        pe = pe[0]  # (T, D)
    if pe.ndim != 2:
        raise ValueError(f"pos_embed of shape {tuple(pe.shape)}: expected (1, T, D) or (T, D)")
    gh, gw = grid
    T = num_prefix_tokens + gh * gw
    if pe.shape[0] != T:
        raise ValueError(
            f"pos_embed has {pe.shape[0]} positions but grid {gh}x{gw} with {num_prefix_tokens} prefix "
            f"token(s) needs {T}; pass num_prefix_tokens=0 if the embedding has no entries for prefix tokens")
    patches = F.normalize(pe[num_prefix_tokens:].float(), dim=-1)  # (N, D)
    sim = patches @ patches.T  # (N, N)
    return sim.reshape(gh, gw, gh, gw)


def grid_distances(grid: GridSize, device=None) -> torch.Tensor:
    """Euclidean distance between patch grid positions, in patches -> (N, N) float32."""
    gh, gw = grid
    yy, xx = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1).float()  # (N, 2)
    return torch.cdist(pos[None], pos[None])[0]  # (N, N)


def topology_score(sim: torch.Tensor) -> float:
    """Pearson correlation over pairs i != j between similarity and negative grid distance.

    sim: (gh, gw, gh, gw) from position_similarity. Returns NaN when either side is constant
    (e.g. a 1x1 grid, or all embeddings identical).
    """
    if sim.ndim != 4 or tuple(sim.shape[:2]) != tuple(sim.shape[2:]):
        raise ValueError(f"expected a (gh, gw, gh, gw) similarity array, got shape {tuple(sim.shape)}")
    gh, gw = sim.shape[:2]
    n = gh * gw
    s = torch.as_tensor(sim).float().reshape(n, n)  # (N, N)
    d = -grid_distances((gh, gw), device=s.device)  # (N, N)
    off = ~torch.eye(n, dtype=torch.bool, device=s.device)  # the diagonal is 1 by construction: leave it out
    x, y = s[off].double(), d[off].double()  # (N * (N - 1),)
    x, y = x - x.mean(), y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return float((x @ y).item() / denom) if denom > 0 else float("nan")
