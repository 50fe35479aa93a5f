"""`vitx analyze`: the ViT paper's analyses of a saved checkpoint, without training.

    vitx analyze --ckpt RUN/checkpoints/last.ckpt --images DIR|SHARDS --out OUT [--num-images 8]

Rebuilds the VisionTransformer of the checkpoint (vit_experiments.checkpoints: a ViT, a DeiT student or CLIP's
image tower, written by `vitx fit` or published weights of another library -- timm, Hugging Face, big_vision --
from a local file or folder, the architecture inferred; `--num-heads N` where the heads cannot be) with its
weights, takes the first `--num-images` images of
DIR (image files, sorted by path; or, if DIR holds WebDataset shards, its val-*.tar shards) or of a shard
pattern, prepares them like the evaluation pipeline (resize + centre crop, normalised with the mean/std the
model was trained with), and writes the figures and numbers of vit_experiments.analysis.report into OUT:
mean attention distance per head against depth (Fig. 11 of Dosovitskiy et al. 2021), position-embedding
similarity and its topology score (Fig. 9), attention rollout (Fig. 12) and the principal components of the
patch-embedding filters (Fig. 10), as PNG, JSON and CSV.

Beyond the paper, on the same probe images: attention entropy, the largest pre-softmax logit and attention NMI per
layer, and the high-norm outlier tokens with where they sit. On a larger representation set (`--probe-images`,
512 by default, with labels when the images carry them: see vit_experiments/probe_set.py): linear CKA between
every pair of layers and, with `--compare CKPT`, between this checkpoint's layers and another's (before/after
fine-tuning, ViT vs DeiT, two seeds); and ridge probes on each layer's class token and mean patch token.
analysis.json names them entropy, outlier_tokens, cka and probe.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Any, Optional, Sequence

import torch

from vit_experiments.checkpoints import CheckpointInfo, read_checkpoint
from vit_experiments.image_files import IMAGE_EXTENSIONS, image_files
from vit_experiments.models.vit import VisionTransformer


# -- the model ---------------------------------------------------------------------------------------------------
def load_vit(ckpt_path: str, trust_checkpoint: bool = False,
             num_heads: Optional[int] = None) -> tuple[VisionTransformer, CheckpointInfo]:
    """The VisionTransformer of a checkpoint (a ViT or DeiT network, CLIP's image tower), in eval mode, and the
    checkpoint's description (normalisation, class names, step). `num_heads` sets the heads of an architecture
    inferred from the weights."""
    info = read_checkpoint(ckpt_path, trust=trust_checkpoint, num_heads=num_heads)
    if info.config is None:
        raise ValueError(f"{ckpt_path} holds bare weights whose architecture vitx cannot tell ({info.describe()}); "
                         "`vitx analyze` reads vitx checkpoints and ViT/DeiT weights in the timm, Hugging Face or "
                         "big_vision layouts")
    for note in info.notes:
        print(f"vitx analyze: {note}", file=sys.stderr)
    return info.vision_transformer().eval(), info


# -- the images --------------------------------------------------------------------------------------------------
def load_images(spec: str, size: int, num: int, crop_pct: float = 0.875) -> tuple[torch.Tensor, list[str]]:
    """The first `num` images of a folder, a shard folder, a shard pattern or one image file -> (uint8 (n, 3, size,
    size), names), prepared like the evaluation pipeline (resize the shorter side, centre crop)."""
    from data_pipelines.shards import iter_shard
    from data_pipelines.urls import expand_urls
    from data_pipelines.transforms import decode_eval, image_bytes

    items: list[tuple[str, bytes]] = []
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "val-*.tar"))) or sorted(glob.glob(os.path.join(spec, "*.tar")))
        files = [] if shards else image_files(spec)
        if not shards and not files:
            raise FileNotFoundError(f"{spec} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
        for f in files[:num]:
            with open(f, "rb") as fh:
                items.append((os.path.relpath(f, spec), fh.read()))
    elif os.path.isfile(spec) and spec.lower().endswith(IMAGE_EXTENSIONS):
        shards = []
        with open(spec, "rb") as fh:
            items.append((os.path.basename(spec), fh.read()))
    else:
        shards = expand_urls(spec)
    for url in shards:
        for _, sample, problem in iter_shard(url):
            if len(items) >= num:
                break
            try:
                if problem is None:
                    items.append((sample["__key__"], image_bytes(sample)))
            except KeyError:
                continue  # a sample without an image (e.g. a text-only one)
        if len(items) >= num:
            break
    if not items:
        raise FileNotFoundError(f"no images found in {spec}")
    arrays, names = [], []
    for name, data in items[:num]:
        try:
            arrays.append(torch.from_numpy(decode_eval(data, size, crop_pct).copy()))
        except Exception as err:
            print(f"vitx analyze: skipping {name}: {type(err).__name__}: {err}", file=sys.stderr)
            continue
        names.append(name)
    if not arrays:
        raise ValueError(f"none of the images in {spec} could be decoded")
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous(), names  # (n, 3, size, size)


# -- the command -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitx analyze",
        description="Mean attention distance (ViT Fig. 11), position-embedding similarity (Fig. 9), attention "
                    "rollout (Fig. 12) and patch-embedding filter components (Fig. 10) of a saved checkpoint.")
    p.add_argument("--ckpt", required=True,
                   help="a vitx checkpoint (RUN/checkpoints/last.ckpt), or ViT/DeiT weights of timm (.pth, .bin, "
                        ".safetensors), Hugging Face (a save_pretrained folder) or big_vision (.npz)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of imported weights whose config does not name them (default: 64-wide "
                        "heads, embed_dim // 64)")
    p.add_argument("--images", required=True,
                   help="a folder of images, a folder of WebDataset shards (val-*.tar preferred), a shard pattern "
                        "(data/shapes/val-{000000..000001}.tar) or one image file")
    p.add_argument("--out", required=True, help="output folder for PNG, JSON and CSV")
    p.add_argument("--num-images", type=int, default=8, help="probe images to analyse (default 8)")
    p.add_argument("--probe-images", type=int, default=512,
                   help="images for CKA and the linear probes (default 512; probes need labels: classification "
                        "shards or a folder of class sub-folders); 0 turns both off")
    p.add_argument("--compare", default=None,
                   help="a second checkpoint: linear CKA between its layers and --ckpt's on the same images")
    p.add_argument("--batch-size", type=int, default=64, help="minibatch of the CKA / probe pass (default 64)")
    p.add_argument("--rollout-token", type=int, default=0, help="0: class token; 1: DeiT's distillation token")
    p.add_argument("--num-components", type=int, default=28, help="principal components of the filters to draw")
    p.add_argument("--crop-pct", type=float, default=0.875, help="centre-crop fraction for images not at size")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (default: the checkpoint's)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    return p


def main_analyze(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
    from vit_experiments.analysis.report import analyze_model, save_report

    if args.num_images < 1:
        raise SystemExit("vitx analyze: --num-images must be >= 1")
    try:
        model, info = load_vit(args.ckpt, args.trust_checkpoint, args.num_heads)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitx analyze: {err}", file=sys.stderr)
        return 2
    cfg = model.cfg
    saved = info.normalization or {}
    mean, std = args.mean or saved.get("mean"), args.std or saved.get("std")
    if mean is None or std is None:
        print("vitx analyze: the checkpoint names no mean/std; using ImageNet's (set --mean/--std otherwise)",
              file=sys.stderr)
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    where = "the checkpoint's" if saved and not (args.mean or args.std) else "given"
    print(f"normalisation ({where}): mean {[round(m, 4) for m in mean]}, std {[round(s, 4) for s in std]}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        images, names = load_images(args.images, cfg.image_size, args.num_images, args.crop_pct)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitx analyze: {err}", file=sys.stderr)
        return 2
    if cfg.in_chans == 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)  # (n, 1, H, W) grayscale
    if len(mean) != cfg.in_chans or len(std) != cfg.in_chans:
        print(f"vitx analyze: mean/std need {cfg.in_chans} values, got {list(mean)} / {list(std)}", file=sys.stderr)
        return 2
    model.to(device)
    try:
        representation = representation_inputs(args, model, mean, std, device)
    except (ValueError, FileNotFoundError) as err:
        print(f"vitx analyze: {err}", file=sys.stderr)
        return 2
    result = analyze_model(model, normalize(images.to(device), mean, std), images, num_components=args.num_components,
                           rollout_token=args.rollout_token, **representation)
    extra = {"checkpoint": os.path.abspath(args.ckpt), "images": args.images, "image_names": names,
             "epoch": info.epoch, "global_step": info.global_step, "family": info.family, "layout": info.source,
             "normalization": {"mean": list(mean), "std": list(std)}}
    extra["compare"] = os.path.abspath(args.compare) if args.compare else None
    paths = save_report(result, args.out, extra=extra)
    print(summary_text(result))
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def summary_text(result: dict) -> str:
    lines = [f"{result['num_images']} images, {result['num_layers']} layers x {result['num_heads']} heads, "
             f"grid {result['grid_size'][0]}x{result['grid_size'][1]} of {result['patch_size']}-px patches, "
             f"{result['num_prefix_tokens']} prefix token(s)",
             "layer  mean attention distance (px): mean  min  max   prefix share"]
    for i in range(result["num_layers"]):
        lines.append(f"{i + 1:5d}  {result['distance_mean'][i]:8.2f} {result['distance_min'][i]:8.2f} "
                     f"{result['distance_max'][i]:8.2f}   {result['prefix_attention'][i].mean():.3f}")
    if result.get("topology_score") is not None:
        lines.append(f"position-embedding topology score: {result['topology_score']:.3f}")
    e, o = result.get("entropy"), result.get("outlier_tokens")
    if e is not None and o is not None:
        lines.append(f"layer  attention entropy (nats, uniform {e['max_entropy']:.2f}): mean  min   NMI   "
                     f"logit max   outlier tokens (norm > median + {o['k']:g} MAD)")
        for i in range(result["num_layers"]):
            lines.append(f"{i + 1:5d}  {e['entropy'][i].mean():8.3f} {e['entropy'][i].min():6.3f} "
                         f"{e['nmi'][i].mean():6.3f} {e['logit_max'][i]:10.2f}   {100 * o['share'][i]:6.2f}%")
    cka = result.get("cka")
    if cka is not None:
        within = cka["within"]
        lines.append(f"CKA on {cka['num_images']} images: layer i vs i-1 " +
                     " ".join(f"{within[i, i - 1]:.2f}" for i in range(1, within.shape[0])))
        if cka["compare"] is not None:
            n = min(cka["compare"].shape)
            lines.append("CKA against --compare, layer i vs layer i: " +
                         " ".join(f"{cka['compare'][i, i]:.2f}" for i in range(n)))
    probe = result.get("probe")
    if probe is not None:
        lines.append(f"linear probes ({probe['num_train']} train / {probe['num_test']} test images, "
                     f"{probe['num_classes']} classes, majority class {probe['chance']:.2f}):")
        for name in ("cls_accuracy", "patch_accuracy"):
            if probe[name] is not None:
                lines.append(f"  {name:15s}" + " ".join(f"{a:.2f}" for a in probe[name]))
    elif result.get("probe_skipped"):
        lines.append(f"linear probes skipped: {result['probe_skipped']}")
    return "\n".join(lines)


def representation_inputs(args: argparse.Namespace, model: VisionTransformer, mean, std,
                          device: torch.device) -> dict:
    """analyze_model's keyword arguments for the representation set (--probe-images) and --compare."""
    from data_pipelines.transforms import normalize
    from vit_experiments.probe_set import load_probe_set

    if args.probe_images < 0 or args.batch_size < 4:
        raise ValueError("--probe-images must be >= 0 and --batch-size >= 4 (the unbiased CKA estimator)")
    probe = load_probe_set(args.images, args.probe_images)
    if probe is None or len(probe) < 4:
        if args.compare:
            raise ValueError("--compare needs a representation set of 4 images or more: --probe-images >= 4 and "
                             "--images a folder or shards")
        return {}
    images, labels = probe.decode(model.cfg.image_size, args.crop_pct, model.cfg.in_chans)
    kw: dict = {"representation_images": normalize(images.to(device), mean, std), "representation_labels": labels,
                "representation_batch_size": args.batch_size,
                "num_classes": len(probe.class_names) if labels is not None and probe.class_names else None}
    print(f"representation set: {len(images)} images" + (f", {len(set(labels.tolist()))} classes" if labels
                                                          is not None else ", no labels (no probes)"))
    if args.compare:
        other, info = load_vit(args.compare, args.trust_checkpoint)
        saved = info.normalization or {}
        other_images, _ = probe.decode(other.cfg.image_size, args.crop_pct, other.cfg.in_chans)
        kw["compare"] = other.to(device)
        kw["compare_images"] = normalize(other_images.to(device), saved.get("mean") or mean, saved.get("std") or std)
    return kw
