"""`vitx export`: a vitx ViT or DeiT in another library's layout, to use it outside vitx.

    vitx export --ckpt RUN/checkpoints/last.ckpt --format timm --out vit.safetensors   # or vit.pth, or a folder
    vitx export --ckpt RUN/checkpoints/last.ckpt --format hf --out vit-hf/

- timm: the state dict (vitx's key names are timm's: Dosovitskiy et al. 2021's ViT as pytorch-image-models
  builds it, DeiT's dist_token/head_dist, reg_token, norm_pre, fc_norm), the position embedding with entries for
  the prefix tokens (timm's no_embed_class=False), as .safetensors or .pth. To a folder: model.safetensors and a
  config.json in timm's hub form (architecture, model_args with every size, pretrained_cfg with the input size,
  normalisation and class names), which `vitx` reads back, heads included.
- hf: a folder that transformers.ViTForImageClassification.from_pretrained loads (a distilled DeiT:
  DeiTForImageClassificationWithTeacher), with a preprocessor_config.json holding the normalisation and
  config.json's id2label the class names. Needs `transformers`. Models the Hugging Face ViT cannot express
  (register tokens, average pooling, norm_pre, a patch projection without bias) are refused: export those as timm.

Any checkpoint vitx reads can be exported (a vitx run, or imported weights: a conversion between layouts).
A CLIP exports as hf (transformers.CLIPModel) or open_clip: vit_experiments/checkpoints/clip_export.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import torch

from vit_experiments.checkpoints import CheckpointInfo, read_checkpoint
from vit_experiments.checkpoints.hf_vit import HF_ACT_NAMES
from vit_experiments.models.vit import VARIANTS, ViTConfig

TIMM_NAMES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
TIMM_ACTIVATIONS = {"gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def _vit(info: CheckpointInfo) -> ViTConfig:
    if info.family != "vit" or not isinstance(info.config, ViTConfig):
        raise ValueError(f"{info.describe()}: `vitx export` writes ViT and DeiT classifiers; this is "
                         f"{'bare weights without an architecture' if info.config is None else info.family}")
    if info.config.pos_embed_type != "learn":
        raise ValueError("a fixed sin-cos position embedding has no place in timm's or Hugging Face's ViT weights")
    return info.config


def timm_name(cfg: ViTConfig) -> str:
    """timm's model name for the size of `cfg` (model_args in config.json give every field anyway)."""
    for name, (depth, dim, mlp, heads) in VARIANTS.items():
        if (cfg.depth, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads) == (depth, dim, mlp, heads):
            kind = "deit" if cfg.num_distill_tokens else "vit"
            distilled = "_distilled" if cfg.num_distill_tokens else ""
            return f"{kind}_{TIMM_NAMES[name]}{distilled}_patch{cfg.patch_size}_{cfg.image_size}"
    return "deit_base_distilled_patch16_224" if cfg.num_distill_tokens else "vit_base_patch16_224"


def timm_config(info: CheckpointInfo) -> dict:
    cfg = _vit(info)
    args = dict(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                global_pool=cfg.pool, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_dim / cfg.embed_dim, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
                reg_tokens=cfg.num_reg_tokens, no_embed_class=False, pre_norm=cfg.pre_norm, fc_norm=cfg.fc_norm)
    if cfg.act in TIMM_ACTIVATIONS:
        args["act_layer"] = TIMM_ACTIVATIONS[cfg.act]
    if not cfg.patch_bias:
        args["patch_bias"] = False
    pretrained = {"input_size": [cfg.in_chans, cfg.image_size, cfg.image_size], "num_classes": cfg.num_classes,
                  "first_conv": "patch_embed.proj", "classifier": "head"}
    if info.normalization:
        pretrained.update(mean=list(info.normalization["mean"]), std=list(info.normalization["std"]))
    out = {"architecture": timm_name(cfg), "num_classes": cfg.num_classes, "num_features": cfg.embed_dim,
           "global_pool": cfg.pool, "model_args": args, "pretrained_cfg": pretrained}
    if info.class_names:
        out["label_names"] = list(info.class_names)
    return out


def export_timm(info: CheckpointInfo, out: str) -> list[str]:
    """Write the weights in timm's layout to `out` (.safetensors, .pth/.bin, or a folder). Returns the paths."""
    cfg = _vit(info)
    state = {k: v.detach().contiguous() for k, v in info.state_dict.items()}
    if cfg.norm_eps != 1e-6:
        print(f"vitx export: this model's LayerNorm epsilon is {cfg.norm_eps}; timm's ViT uses 1e-6 unless built with "
              "another norm_layer", file=sys.stderr)
    if out.endswith((".pth", ".bin", ".pt")):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(state, out)
        return [out]
    from safetensors.torch import save_file

    if out.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_file(state, out, metadata={"format": "pt"})
        return [out]
    os.makedirs(out, exist_ok=True)
    weights, config = os.path.join(out, "model.safetensors"), os.path.join(out, "config.json")
    save_file(state, weights, metadata={"format": "pt"})
    with open(config, "w") as f:
        json.dump(timm_config(info), f, indent=2)
    return [weights, config]


def hf_model(info: CheckpointInfo):
    """The transformers model (ViTForImageClassification, or DeiTForImageClassificationWithTeacher for a distilled
    DeiT) with the weights of `info`."""
    import transformers

    from vit_experiments.checkpoints.hf_vit import vitx_name

    cfg = _vit(info)
    unsupported = [what for what, bad in (
        ("register tokens", cfg.num_reg_tokens > 0), ("average pooling", cfg.pool != "token"),
        ("norm_pre", cfg.pre_norm), ("a patch projection without bias", not cfg.patch_bias)) if bad]
    if unsupported:
        raise ValueError(f"the Hugging Face ViT has no {', '.join(unsupported)}: export this model with --format timm")
    names = info.class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    kwargs = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  intermediate_size=cfg.mlp_dim, hidden_act=HF_ACT_NAMES[cfg.act], layer_norm_eps=cfg.norm_eps,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                  qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=cfg.num_classes, id2label=dict(enumerate(names)),
                  label2id={n: i for i, n in enumerate(names)})
    if cfg.num_distill_tokens:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**kwargs))
    else:
        model = transformers.ViTForImageClassification(transformers.ViTConfig(**kwargs))
    state = {}
    for name in model.state_dict():
        target = vitx_name(name)  # the mapping the reader uses, run backwards: one source of truth
        if target is None:
            continue
        key, part = target
        value = info.state_dict[key]
        state[name] = value if part is None else value.chunk(3, dim=0)[part]  # q, k, v out of the fused (3D, ...)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export_hf(info: CheckpointInfo, out: str) -> list[str]:
    """Write a save_pretrained folder (config.json, model.safetensors, preprocessor_config.json) to `out`."""
    model = hf_model(info)
    model.save_pretrained(out)
    cfg = info.config
    norm = info.normalization or {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
           "size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(norm["mean"]),
           "image_std": list(norm["std"]), "resample": 2}
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f, indent=2)
    return sorted(os.path.join(out, n) for n in os.listdir(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitx export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="any checkpoint vitx reads (RUN/checkpoints/last.ckpt, ...)")
    p.add_argument("--format", required=True, choices=("timm", "hf", "open_clip"), help="timm: a state dict; hf: a "
                   "save_pretrained folder for transformers; open_clip (CLIP): a state dict or folder, see "
                   "vit_experiments/checkpoints/clip_export.py")
    p.add_argument("--out", required=True, help="timm: FILE.safetensors, FILE.pth or a folder; hf: a folder")
    p.add_argument("--num-heads", type=int, default=None, help="heads of imported weights that do not name them")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (only for files you trust)")
    return p


def main_export(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = read_checkpoint(args.ckpt, trust=args.trust_checkpoint, num_heads=args.num_heads)
        info = dataclasses.replace(info, state_dict=info.build().state_dict())  # every key checked on the way
        if info.family == "clip" or args.format == "open_clip":
            from vit_experiments.checkpoints.clip_export import export_clip

            paths, notes = export_clip(info, args.format, args.out)
            info.notes.extend(notes)
        else:
            paths = export_timm(info, args.out) if args.format == "timm" else export_hf(info, args.out)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"vitx export: {err}", file=sys.stderr)
        return 2
    for note in info.notes:
        print(f"vitx export: {note}", file=sys.stderr)
    print(f"wrote {', '.join(paths)}")
    return 0
