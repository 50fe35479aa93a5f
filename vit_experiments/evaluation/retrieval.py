"""Image-text retrieval recall at k, for corpora with several captions per image (Flickr, COCO).

The protocol of Karpathy & Fei-Fei 2015 ("Deep Visual-Semantic Alignments for Generating Image Descriptions")
used by CLIP (Radford et al. 2021, Table 13): text -> image R@k is the share of captions whose image is among
the k images most similar to it; image -> text R@k is the share of images for which *any* of their captions is
among the k most similar captions. Ties count against the query: a query's rank is the number of wrong candidates
scoring at least as high as its best right one, so a collapsed model (every similarity equal) scores 0 at every k
below the number of wrong candidates (not chance, and not the 1 that ties counted for the query would give).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _check(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"expected image (N_img, E) and text (N_txt, E) features, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(f"text_to_image must hold one image index per caption: ({text_features.shape[0]},), "
                         f"got {tuple(text_to_image.shape)}")
    if text_to_image.numel() and (text_to_image.min() < 0 or text_to_image.max() >= image_features.shape[0]):
        raise ValueError(f"text_to_image has indices outside [0, {image_features.shape[0]})")


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """{"image_to_text/R@k": ..., "text_to_image/R@k": ...} for every k.

    image_features: (N_img, E); text_features: (N_txt, E) (normalised here); text_to_image: (N_txt,) int, the
    image of each caption. Images without a caption are left out of image -> text. Similarities are computed
    `chunk` queries at a time, so N_img x N_txt need not fit in memory at once.
    """
    _check(image_features, text_features, text_to_image)
    img = F.normalize(image_features.float(), dim=-1)  # (N_img, E)
    txt = F.normalize(text_features.float(), dim=-1)  # (N_txt, E)
    owner = text_to_image.to(img.device).long()  # (N_txt,)
    n_img = img.shape[0]

    # text -> image: rank of the caption's own image among all images (0 = first)
    t2i_rank = []
    for s in range(0, txt.shape[0], chunk):
        sims = txt[s : s + chunk] @ img.T  # (c, N_img)
        own = owner[s : s + chunk]  # (c,)
        true = sims.gather(1, own[:, None])  # (c, 1)
        others = torch.ones_like(sims, dtype=torch.bool).scatter_(1, own[:, None], False)  # (c, N_img)
        t2i_rank.append(((sims >= true) & others).sum(dim=1))  # (c,)
    t2i_rank = torch.cat(t2i_rank)  # (N_txt,)

    # image -> text: rank of the best of the image's captions among all captions
    i2t_rank, has_caption = [], torch.zeros(n_img, dtype=torch.bool, device=img.device)
    has_caption[owner] = True
    for s in range(0, n_img, chunk):
        sims = img[s : s + chunk] @ txt.T  # (c, N_txt)
        mine = owner[None, :] == torch.arange(s, s + sims.shape[0], device=img.device)[:, None]  # (c, N_txt)
        best = sims.masked_fill(~mine, float("-inf")).max(dim=1, keepdim=True).values  # (c, 1)
        i2t_rank.append(((sims >= best) & ~mine).sum(dim=1))  # (c,)
    i2t_rank = torch.cat(i2t_rank)[has_caption]  # (N_img with captions,)

    out = {}
    for k in ks:
        out[f"image_to_text/R@{k}"] = (i2t_rank < k).float().mean().item()
        out[f"text_to_image/R@{k}"] = (t2i_rank < k).float().mean().item()
    return out


def retrieval_chance(text_to_image: torch.Tensor, num_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The expected recall of random embeddings, same keys as retrieval_recall: text -> image k / N_img;
    image -> text the chance that k of N_txt captions drawn at random include one of the image's."""
    counts = torch.bincount(text_to_image.long().cpu(), minlength=num_images)
    counts = counts[counts > 0].tolist()
    n_txt = len(text_to_image)
    out = {}
    for k in ks:
        k_t = min(k, n_txt)
        miss = [math.comb(n_txt - c, k_t) / math.comb(n_txt, k_t) for c in counts]
        out[f"image_to_text/R@{k}"] = 1.0 - sum(miss) / len(miss)
        out[f"text_to_image/R@{k}"] = min(k, num_images) / num_images
    return out
