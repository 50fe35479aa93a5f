"""Principal components of the patch-embedding filters.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", Fig. 10 (left): the first principal
components of the learned linear embedding of flattened patches look like plausible basis functions for
a low-dimensional representation of each patch's fine structure (edges, gratings, colour blobs).

The embedding is the stride-P convolution weight (D, C, P, P): D filters, each a C x P x P image. PCA
treats the D filters as samples of a C*P*P-dimensional vector.
"""
from typing import NamedTuple, Optional

import torch


class FilterComponents(NamedTuple):
    components: torch.Tensor  # (k, C, P, P) unit-norm principal directions, largest variance first
    explained_variance_ratio: torch.Tensor  # (k,) share of the filters' total variance along each


def patch_embed_components(weight: torch.Tensor, k: Optional[int] = 28) -> FilterComponents:
    """Top-k principal components of the patch-embedding filters (k=None: all of them).

    weight: (D, C, P, P) conv weight (or (D, C, ph, pw)). Each component's sign is fixed so that its
    largest-magnitude entry is positive, so results are reproducible across runs and devices.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected the patch embedding conv weight (D, C, P, P), got shape {tuple(weight.shape)}")
    d, c, ph, pw = weight.shape
    x = weight.detach().float().reshape(d, c * ph * pw)  # (D, C*P*P) one row per filter
    x = x - x.mean(0, keepdim=True)  # PCA is about variance around the mean filter
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (r, C*P*P), r = min(D, C*P*P)
    var = s**2  # (r,)
    total = var.sum()
    ratio = var / total if total > 0 else torch.zeros_like(var)  # (r,)
    k = vh.shape[0] if k is None else min(k, vh.shape[0])
    comps = vh[:k]  # (k, C*P*P)
    peak = comps.gather(1, comps.abs().argmax(1, keepdim=True))  # (k, 1) signed largest entry
    comps = comps * torch.where(peak < 0, -1.0, 1.0)
    return FilterComponents(comps.reshape(k, c, ph, pw), ratio[:k])
