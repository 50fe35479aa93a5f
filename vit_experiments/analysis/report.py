"""All analyses of one Vision Transformer on one batch of images, and writing them to disk.

Runs the model once on a probe batch with its attention maps and computes, after Dosovitskiy et al.
2021 ("An Image is Worth 16x16 Words"): mean attention distance per (layer, head) (Fig. 11),
position-embedding similarity and its topology score (Fig. 9), attention rollout maps (Fig. 12; Abnar &
Zuidema 2020) and the principal components of the patch-embedding filters (Fig. 10); and beyond the paper:
attention entropy, the largest pre-softmax logit and attention NMI per layer (Zhai et al. 2023; Park et al. 2023),
high-norm outlier tokens (Darcet et al. 2024), linear CKA between layers and against a second model (Kornblith
et al. 2019; Nguyen et al. 2021) and per-layer linear probes (result keys entropy, outlier_tokens, cka, probe).
Shared by the training callback and by `vitx analyze` on a saved checkpoint; scalars(result) names every number
as a TensorBoard tag.

The model is anything with the VisionTransformer interface: forward_features(x, return_attention=True)
-> (tokens, [attn (B, heads, T, T) per layer]), patch_embed.proj (the stride-P convolution), pos_embed,
and cfg.patch_size / cfg.grid_size / cfg.num_prefix_tokens (derived from the modules when there is no cfg).
"""
import csv
import json
import math
import os
import time
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .attention_distance import attention_distance_by_layer
from .entropy import entropy_by_layer, logit_max_by_layer, nmi_by_layer
from .outlier_tokens import outliers_by_layer
from .patch_filters import patch_embed_components
from .plots import (
    filter_components_image,
    image_grid,
    plot_attention_distance,
    plot_filter_components,
    plot_position_similarity,
    plot_rollout,
    rollout_overlay_images,
    similarity_tiles_image,
    uniform_attention_distance,
)
from .plots_representation import plot_attention_statistics, plot_cka, plot_outlier_tokens, plot_probes
from .position_similarity import position_similarity, topology_score
from .representations import LayerOutputs, representation_analysis
from .rollout import attention_rollout

FIGURES = ("attention_distance", "position_similarity", "rollout", "patch_filters")


def vit_geometry(model: nn.Module, image_hw: Optional[Tuple[int, int]] = None) -> Tuple[Tuple[int, int], int, int]:
    """(grid (gh, gw), patch_size, num_prefix_tokens) of a VisionTransformer.

    Read from model.cfg when present; otherwise from the patch-embedding kernel, the image size and the
    length of pos_embed.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is not None and all(hasattr(cfg, a) for a in ("patch_size", "grid_size", "num_prefix_tokens")):
        gh, gw = cfg.grid_size
        return (int(gh), int(gw)), int(cfg.patch_size), int(cfg.num_prefix_tokens)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    pos = getattr(model, "pos_embed", None)
    if proj is None or pos is None or image_hw is None:
        raise ValueError(
            f"cannot tell the patch grid of {type(model).__name__}: it needs cfg.patch_size, cfg.grid_size and "
            f"cfg.num_prefix_tokens (or patch_embed.proj and pos_embed); pass the VisionTransformer itself "
            f"(for CLIP, the image tower)")
    p = int(proj.kernel_size[0])
    grid = (image_hw[0] // p, image_hw[1] // p)
    return grid, p, int(pos.shape[-2]) - grid[0] * grid[1]


def _wanted(figures: Union[bool, Iterable[str]]) -> Tuple[str, ...]:
    if figures is True:
        return FIGURES
    if figures is False or figures is None:
        return ()
    names = tuple(figures)
    unknown = set(names) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; choose from {list(FIGURES)}")
    return names


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    images: torch.Tensor,
    display_images: Optional[torch.Tensor] = None,
    *,
    num_components: int = 28,
    rollout_token: int = 0,
    figures: Union[bool, Iterable[str]] = True,
    labels: Optional[torch.Tensor] = None,
    representation_images: Optional[torch.Tensor] = None,
    representation_labels: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
    compare: Optional[nn.Module] = None,
    compare_images: Optional[torch.Tensor] = None,
    representation_batch_size: int = 64,
    outlier_k: float = 10.0,
) -> Dict[str, Any]:
    """Run every analysis on one batch; returns a dict of numbers (numpy), images and figures.

    images: (B, C, H, W) float, normalised as the model expects, H and W equal to the model's image size.
    display_images: the same images for drawing (uint8 (B, C, H, W) preferred); defaults to `images`,
      min-max scaled per image.
    rollout_token: the prefix token whose rollout is drawn (0 = class token, 1 = DeiT's distillation token).
    figures: True for all matplotlib figures, False for none, or names from FIGURES. Anything but False also renders
      the labelled images of the entropy, outlier, CKA and probe analyses into result["images"].
    labels: (B,) class indices of `images`, for the probes when there is no separate representation set.
    representation_images / representation_labels: a larger (M, C, H, W) set (and its (M,) labels) for CKA and the
      probes, run through the model in minibatches of representation_batch_size; by default the probe batch,
      whose layer outputs are reused from the attention pass.
    compare / compare_images: a second VisionTransformer and the same images (representation_images, or images)
      prepared for it, for the model-vs-model CKA.
    outlier_k: MADs above the median norm that make a patch token an outlier (analysis/outlier_tokens.py).
    The model is put in eval mode (no dropout, no stochastic depth) and restored to its previous mode.
    """
    t0 = time.perf_counter()
    wanted = _wanted(figures)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a float tensor of shape (B, C, H, W), normalised as for training")
    if not images.is_floating_point():
        raise ValueError("images must be normalised float tensors (mean/std applied), not uint8; "
                         "pass the uint8 originals as display_images")
    grid, patch, prefix = vit_geometry(model, tuple(images.shape[-2:]))
    expected = (grid[0] * patch, grid[1] * patch)
    if tuple(images.shape[-2:]) != expected:
        raise ValueError(f"images are {tuple(images.shape[-2:])} but the model takes {expected}; resize or "
                         f"centre-crop them to the model's image size")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with LayerOutputs(model) as layers:  # the embedding and every block's output, (B, T, D) each
            _, attns, logit_maxes = model.forward_features(images.to(param.device, param.dtype),
                                                           return_attention=True, return_logit_max=True)
    finally:
        model.train(was_training)
    hidden = layers.outputs

    dist = attention_distance_by_layer(attns, grid, patch, prefix)
    d = dist.distance.cpu().numpy()  # (L, heads)
    result: Dict[str, Any] = {
        "num_images": int(images.shape[0]),
        "image_size": list(expected),
        "grid_size": list(grid),
        "patch_size": patch,
        "num_prefix_tokens": prefix,
        "num_layers": int(d.shape[0]),
        "num_heads": int(d.shape[1]),
        "attention_distance": d,
        "prefix_attention": dist.prefix_share.cpu().numpy(),  # (L, heads)
        "distance_mean": np.nanmean(d, axis=1),  # (L,)
        "distance_min": np.nanmin(d, axis=1),
        "distance_max": np.nanmax(d, axis=1),
    }

    pos = getattr(model, "pos_embed", None)
    if isinstance(pos, torch.Tensor):
        sim = position_similarity(pos, grid, prefix)
        result["position_similarity"] = sim.cpu().numpy()  # (gh, gw, gh, gw)
        result["topology_score"] = topology_score(sim)
    else:  # e.g. a model without a learned absolute position embedding
        result["position_similarity"] = None
        result["topology_score"] = None

    T = int(attns[0].shape[-1])
    result["entropy"] = {
        "entropy": entropy_by_layer(attns, prefix).cpu().numpy(),  # (L, heads) nats, patch queries, all keys
        "nmi": nmi_by_layer(attns, prefix).cpu().numpy(),  # (L, heads) patch queries and keys
        "logit_max": logit_max_by_layer(logit_maxes).cpu().numpy(),  # (L,)
        "logit_max_per_head": torch.stack([m.float().amax(0) for m in logit_maxes]).cpu().numpy(),  # (L, heads)
        "max_entropy": math.log(T),
        "num_tokens": T,
    }
    out = outliers_by_layer([h.float() for h in hidden[1:]], grid, prefix, outlier_k)
    shown = int(torch.nonzero(out.share == out.share.max())[-1]) if out.share.max() > 0 else len(hidden) - 2
    result["outlier_tokens"] = {
        "share": out.share.cpu().numpy(),  # (L,)
        "threshold": out.threshold.cpu().numpy(),  # (L,) norm
        "norm_ratio": out.norm_ratio.cpu().numpy(),  # (L,) largest / median patch norm
        "frequency": out.mask.float().mean(1).cpu().numpy(),  # (L, gh, gw) share of probe images flagged there
        "k": outlier_k,
        "layer_shown": shown + 1,
    }
    result["outlier_mask"] = out.mask.cpu().numpy()  # (L, B, gh, gw)
    if representation_images is None:
        rep = representation_analysis(model, hidden=hidden, labels=labels, num_classes=num_classes,
                                      compare=compare, compare_images=compare_images,
                                      batch_size=representation_batch_size)
    else:
        rep = representation_analysis(model, representation_images, labels=representation_labels,
                                      num_classes=num_classes, compare=compare, compare_images=compare_images,
                                      batch_size=representation_batch_size)
    result.update(rep)
    del hidden, layers

    token = rollout_token if prefix > 0 else 0
    result["rollout"] = attention_rollout(attns, grid, prefix, token_index=token).cpu().numpy()  # (B, gh, gw)
    result["rollout_token"] = token
    del attns

    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(getattr(proj, "weight", None), torch.Tensor) and proj.weight.ndim == 4:
        comps = patch_embed_components(proj.weight, num_components)
        result["filter_components"] = comps.components.cpu().numpy()  # (k, C, P, P)
        result["filter_explained_variance"] = comps.explained_variance_ratio.cpu().numpy()  # (k,)
    else:
        result["filter_components"] = None
        result["filter_explained_variance"] = None

    shown = (display_images if display_images is not None else images).detach().cpu()
    result["probe_images"] = shown  # (B, C, H, W) what the overlays are drawn on
    result["images"] = _images(result)
    if figures is not False and figures is not None:
        result["images"].update(_representation_images(result))
    result["figures"] = {name: _figure(result, name) for name in wanted}
    result["figures"] = {k: v for k, v in result["figures"].items() if v is not None}
    result["seconds"] = time.perf_counter() - t0
    return result


def _images(result: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Pixel-exact (H, W, 3) uint8 images of the analyses, for TensorBoard add_image."""
    out = {}
    if result.get("position_similarity") is not None:
        g = max(result["grid_size"])
        out["position_similarity"] = similarity_tiles_image(result["position_similarity"], scale=max(1, 64 // g))
    overlays = rollout_overlay_images(result["probe_images"], result["rollout"])  # (B, H, W, 3)
    out["rollout"] = image_grid(overlays, ncols=min(8, overlays.shape[0]))
    if result.get("filter_components") is not None:
        out["patch_filters"] = filter_components_image(result["filter_components"],
                                                       scale=max(1, 32 // result["patch_size"]))
    return out


def _representation_images(result: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Labelled matplotlib renders of the entropy, outlier, CKA and probe results, (H, W, 3) uint8."""
    out = {}
    e = result["entropy"]
    out["attention_entropy"] = plot_attention_statistics(e["entropy"], e["nmi"], e["logit_max"], e["max_entropy"])
    o = result["outlier_tokens"]
    out["outlier_tokens"] = plot_outlier_tokens(o["share"], np.asarray(result["probe_images"]),
                                                result["outlier_mask"][o["layer_shown"] - 1], o["layer_shown"],
                                                result["patch_size"], o["k"])
    if result.get("cka") is not None:
        out["cka"] = plot_cka(result["cka"]["within"], result["cka"]["compare"])
    p = result.get("probe")
    if p is not None:
        out["probe"] = plot_probes(p["cls_accuracy"], p["patch_accuracy"], p["chance"], p["num_train"], p["num_test"])
    return out


REPRESENTATION_IMAGES = ("attention_entropy", "outlier_tokens", "cka", "probe")


def _figure(result: Dict[str, Any], name: str):
    if name == "attention_distance":
        return plot_attention_distance(result["attention_distance"], image_size=tuple(result["image_size"]),
                                       title="Mean attention distance",
                                       uniform=uniform_attention_distance(result["grid_size"], result["patch_size"]))
    if name == "position_similarity" and result.get("position_similarity") is not None:
        return plot_position_similarity(result["position_similarity"])
    if name == "rollout":
        return plot_rollout(result["probe_images"], result["rollout"])
    if name == "patch_filters" and result.get("filter_components") is not None:
        return plot_filter_components(result["filter_components"], result["filter_explained_variance"])
    return None


def _finite(x: Any) -> bool:
    return x is not None and bool(np.isfinite(float(x)))


def scalars(result: Dict[str, Any]) -> Dict[str, float]:
    """Every scalar of an analyze_model result, as TensorBoard tags (layers numbered from 1, layer_01 = blocks[0]).

    analysis/attention_distance/layer_XX       mean attention distance (pixels), mean over the heads
    analysis/attention_distance_min/layer_XX   ... the head with the shortest distance
    analysis/attention_distance_max/layer_XX   ... the head with the longest
    analysis/prefix_attention/layer_XX         share of patch queries' attention on the prefix tokens, mean over heads
    analysis/position_embedding/topology_score corr(cosine similarity, -grid distance) over patch pairs
    analysis/attention_entropy/layer_XX        attention entropy (nats), mean over heads
    analysis/attention_entropy_min/layer_XX    ... the lowest head (collapse shows here first)
    analysis/attention_logit_max/layer_XX      largest pre-softmax attention logit of the layer
    analysis/attention_nmi/layer_XX            normalised mutual information of query and key position, mean over heads
    analysis/outlier_tokens/layer_XX           share of patch tokens with an outlier norm
    analysis/outlier_norm_ratio/layer_XX       largest patch-token norm / median patch-token norm
    analysis/cka_adjacent/layer_XX             linear CKA between layer XX and layer XX - 1 (layer_01: the embedding)
    analysis/probe_cls/layer_XX                linear-probe test accuracy on the class token
    analysis/probe_patch/layer_XX              linear-probe test accuracy on the mean patch token
    analysis/cka_compare/diagonal_mean         mean CKA of layer i of the model with layer i of the compared one
    Non-finite values (e.g. a layer without patch queries) are left out; results without an analysis give no tags.
    """
    out: Dict[str, float] = {}

    def per_layer(name: str, values: Any) -> None:
        if values is None:
            return
        for i, v in enumerate(np.asarray(values, dtype=np.float64).reshape(-1)):
            if np.isfinite(v):
                out[f"analysis/{name}/layer_{i + 1:02d}"] = float(v)

    per_layer("attention_distance", result.get("distance_mean"))
    per_layer("attention_distance_min", result.get("distance_min"))
    per_layer("attention_distance_max", result.get("distance_max"))
    if result.get("prefix_attention") is not None:
        per_layer("prefix_attention", np.asarray(result["prefix_attention"]).mean(axis=1))
    if _finite(result.get("topology_score")):
        out["analysis/position_embedding/topology_score"] = float(result["topology_score"])
    entropy = result.get("entropy")
    if entropy:
        per_layer("attention_entropy", np.asarray(entropy["entropy"]).mean(axis=1))
        per_layer("attention_entropy_min", np.asarray(entropy["entropy"]).min(axis=1))
        per_layer("attention_logit_max", entropy.get("logit_max"))
        if entropy.get("nmi") is not None:
            per_layer("attention_nmi", np.asarray(entropy["nmi"]).mean(axis=1))
    outliers = result.get("outlier_tokens")
    if outliers:
        per_layer("outlier_tokens", outliers["share"])
        per_layer("outlier_norm_ratio", outliers["norm_ratio"])
    cka = result.get("cka")
    if cka and cka.get("within") is not None:
        within = np.asarray(cka["within"])  # (L + 1, L + 1), index 0 = the embedding
        per_layer("cka_adjacent", [within[i + 1, i] for i in range(within.shape[0] - 1)])
    if cka and cka.get("compare") is not None:
        cross = np.asarray(cka["compare"])
        n = min(cross.shape)
        if _finite(np.mean(np.diag(cross)[:n])):
            out["analysis/cka_compare/diagonal_mean"] = float(np.mean(np.diag(cross)[:n]))
    probe = result.get("probe")
    if probe:
        per_layer("probe_cls", probe.get("cls_accuracy"))
        per_layer("probe_patch", probe.get("patch_accuracy"))
    return out


def _jsonable(x: Any, ndigits: int = 6) -> Any:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _jsonable(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x).tolist(), ndigits)
    if isinstance(x, dict):
        return {k: _jsonable(v, ndigits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, ndigits) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return round(x, ndigits) if math.isfinite(x) else None  # strict JSON has no NaN
    if isinstance(x, np.integer):
        return int(x)
    return x


def summary(result: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of a result, JSON-ready (figures, images and probe pixels left out)."""
    skip = {"figures", "images", "probe_images", "filter_components", "outlier_mask"}
    out = {k: _jsonable(v) for k, v in result.items() if k not in skip}
    if result.get("filter_components") is not None:
        out["filter_components_shape"] = list(result["filter_components"].shape)
    return out


def save_report(result: Dict[str, Any], out_dir: str, extra: Optional[Dict[str, Any]] = None,
                figures: bool = True) -> Dict[str, str]:
    """Write analysis.json, attention_distance.csv, the pixel images (*_tiles.png) and, with figures=True, the
    matplotlib figures as PNG into out_dir; returns name -> path.

    Figures missing from result["figures"] are drawn here. extra: more JSON fields (e.g. step, epoch,
    checkpoint path).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, str] = {}
    figs = dict(result.get("figures") or {})
    for name in FIGURES if figures else ():
        fig = figs.get(name) or _figure(result, name)
        if fig is not None:
            paths[name] = os.path.join(out_dir, f"{name}.png")
            fig.savefig(paths[name], dpi=120)
    for name, img in (result.get("images") or {}).items():
        key = name if name in REPRESENTATION_IMAGES else f"{name}_tiles"  # labelled figures keep their name
        paths[key] = os.path.join(out_dir, f"{key}.png")
        _save_png(img, paths[key])

    paths["json"] = os.path.join(out_dir, "analysis.json")
    record = {**_jsonable(extra or {}), **summary(result)}
    with open(paths["json"], "w") as f:  # one key per line, arrays on one line: readable and diff-able
        f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n")

    paths["csv"] = os.path.join(out_dir, "attention_distance.csv")
    d, share = result["attention_distance"], result["prefix_attention"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        # layers and heads numbered from 1, as on the figure's depth axis (layer l is model.blocks[l - 1])
        w.writerow(["layer", "head", "mean_attention_distance_px", "prefix_attention_share"])
        for layer in range(d.shape[0]):
            for head in range(d.shape[1]):
                w.writerow([layer + 1, head + 1, f"{d[layer, head]:.6g}", f"{share[layer, head]:.6g}"])
    return paths


def _save_png(img: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(img)).save(path)
