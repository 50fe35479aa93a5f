"""Reader for ViT and DeiT weights in timm's layout (pytorch-image-models' VisionTransformer and DeiT).

timm's key names are vitx's (patch_embed.proj, cls_token, dist_token, reg_token, pos_embed, norm_pre,
blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}, norm, fc_norm, head, head_dist), so the weights load
as they are and only the architecture is inferred (infer.py): a class-token or average-pooled (fc_norm) ViT
(Dosovitskiy et al. 2021), a distilled DeiT (Touvron et al. 2021), register tokens (Darcet et al. 2024), with or
without position-embedding entries for the prefix tokens. The same reader takes bare vitx state dicts.

Files: a state dict (.pth, .bin, .safetensors), bare or under "model" (DeiT's releases) or "state_dict" (timm's
training checkpoints, DDP's "module." prefix dropped), or a timm folder (config.json with "architecture",
model.safetensors or pytorch_model.bin). A timm config.json beside a file, or in the folder, gives the pooling,
the heads (model_args), the input size and normalisation (pretrained_cfg) and the class names.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from vit_experiments.checkpoints.infer import vit_config_from_state
from vit_experiments.checkpoints.info import CheckpointInfo, register_reader
from vit_experiments.checkpoints.io import LoadedDirectory

REQUIRED = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight")


def _tensors(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def timm_state(contents: Any) -> Optional[dict[str, torch.Tensor]]:
    """The ViT state dict inside `contents` when it is in timm's layout, else None."""
    if not isinstance(contents, dict):
        return None
    state = contents
    for key in ("model", "state_dict", "module"):
        if _tensors(contents.get(key)):
            state = contents[key]
            break
    for prefix in ("module.", "model."):  # DDP's wrapper; a Lightning module holding the network as `model`
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if not _tensors(state) or not all(k in state for k in REQUIRED):
        return None
    return dict(state)


def is_timm_config(config: Optional[dict]) -> bool:
    return isinstance(config, dict) and ("architecture" in config or "pretrained_cfg" in config) \
        and "model_type" not in config


def hints_from_timm_config(config: Optional[dict]) -> tuple[dict, Optional[dict], Optional[list[str]]]:
    """(inference hints, normalisation, class names) from a timm config.json."""
    if not is_timm_config(config):
        return {}, None, None
    args = config.get("model_args") or {}
    pre = config.get("pretrained_cfg") or {}
    hints: dict[str, Any] = {"num_heads": args.get("num_heads")}
    pool = args.get("global_pool", config.get("global_pool"))
    if pool in ("token", "avg"):
        hints["pool"] = pool
    size = args.get("img_size") or (pre.get("input_size") or [None])[-1]
    if isinstance(size, int):
        hints["image_size"] = size
    if "quickgelu" in str(config.get("architecture", "")):
        hints["act"] = "quick_gelu"
    norm = {"mean": list(pre["mean"]), "std": list(pre["std"])} if pre.get("mean") and pre.get("std") else None
    names = config.get("label_names") or pre.get("label_names")
    return hints, norm, list(names) if names else None


def _beside(path: str) -> Optional[dict]:
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(candidate):
        return None
    try:
        with open(candidate) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # not ours to judge: a config of something else


@register_reader
def read_timm(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """timm (and bare vitx) ViT/DeiT weights -> CheckpointInfo(source="timm")."""
    if isinstance(contents, LoadedDirectory):
        config = contents.config if is_timm_config(contents.config) else None
        state = timm_state(contents.state_dict)
    else:
        state = timm_state(contents)
        config = _beside(path) if state is not None else None
    if state is None:
        return None
    hints, norm, names = hints_from_timm_config(config)
    cfg, state, notes = vit_config_from_state(state, path, hints)
    if names is not None and len(names) != cfg.num_classes:
        names = None
    return CheckpointInfo(path=path, source="timm", family="vit", config=cfg, state_dict=state,
                          normalization=norm, class_names=names, notes=notes)
