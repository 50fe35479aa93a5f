"""Reader for Hugging Face `transformers` ViT and DeiT checkpoints (a `save_pretrained` folder, or their state
dict alone), and the renaming both ways.

ViT (Dosovitskiy et al. 2021): ViTModel, ViTForImageClassification. DeiT (Touvron et al. 2021): DeiTModel,
DeiTForImageClassification, DeiTForImageClassificationWithTeacher (class and distillation heads, averaged at
inference as vitx's DeiT does). DeiTForImageClassification classifies from the class token alone: its
distillation token, which no head reads, is imported as a register token (Darcet et al. 2024), which vitx's ViT
treats the same way, so the outputs are equal.

Both the transformers 4.x names (`vit.encoder.layer.N.attention.attention.query`) and the 5.x names
(`vit.layers.N.attention.q_proj`) are read; the separate q, k, v projections are concatenated into vitx's fused
qkv. The architecture comes from config.json (heads, LayerNorm epsilon, activation) and the shapes (infer.py);
the normalisation from preprocessor_config.json when present; the class names from id2label.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from vit_experiments.checkpoints.infer import vit_config_from_state
from vit_experiments.checkpoints.info import CheckpointInfo, register_reader
from vit_experiments.checkpoints.io import LoadedDirectory

MODEL_TYPES = ("vit", "deit")
# transformers' activation names -> vitx's
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu"}
# the other way, for export: vitx activation -> the hidden_act transformers builds it from
HF_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu"}

_L = r"(?:encoder\.layer|layers)\.(\d+)"
# (pattern on the name without its "vit."/"deit." prefix, vitx's name); q/k/v go to temporary names first
RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_L + r"\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_L + r"\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_L + r"\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"\.attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_L + r"\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_L + r"\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_L + r"\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (_L + r"\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (_L + r"\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
    (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
]
# parts without a counterpart in vitx: the tanh pooler of ViTModel/DeiTModel (no classifier reads it) and the
# masked-image-modelling token
SKIPPED = [r"pooler\..*", r"embeddings\.mask_token"]
QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def vitx_name(hf_name: str) -> Optional[tuple[str, Optional[int]]]:
    """A transformers ViT/DeiT parameter name -> (vitx name, None), or (the fused qkv name, 0|1|2 for q|k|v),
    or None for a skipped part. Raises KeyError for an unknown name."""
    short = re.sub(r"^(?:vit|deit)\.", "", hf_name)
    if any(re.fullmatch(p, short) for p in SKIPPED):
        return None
    for pattern, target in RENAMES:
        if re.fullmatch(pattern, short):
            new = re.sub(pattern, target, short)
            m = re.fullmatch(r"blocks\.(\d+)\.attn\.(\w+)\.(weight|bias)", new)
            if m and m.group(2) in QKV:
                return f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}", QKV[m.group(2)]
            return new, None
    raise KeyError(hf_name)


def convert_hf_state_dict(hf_state: dict[str, torch.Tensor], path: str = "") -> dict[str, torch.Tensor]:
    """transformers ViT/DeiT state dict -> vitx's layout. Unknown names raise, so nothing is dropped silently."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    unknown = []
    for name, tensor in hf_state.items():
        try:
            target = vitx_name(name)
        except KeyError:
            unknown.append(name)
            continue
        if target is None:
            continue
        new, index = target
        if index is None:
            out[new] = tensor
        else:
            parts.setdefault(new, {})[index] = tensor
    if unknown:
        raise ValueError(f"{path}: not a Hugging Face ViT/DeiT state dict vitx can read: unrecognised parameters "
                         f"{unknown[:8]}")
    for name, pieces in parts.items():
        if sorted(pieces) != [0, 1, 2]:
            raise ValueError(f"{path}: {name} has only {len(pieces)} of the q, k, v projections: the checkpoint is "
                             "incomplete")
        out[name] = torch.cat([pieces[0], pieces[1], pieces[2]], dim=0)  # (3D, D) or (3D,)
    return out


def hints_from_hf_config(config: dict) -> dict[str, Any]:
    act = config.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {act!r} is not one vitx's ViT has; valid: {', '.join(HF_ACTIVATIONS)}")
    head_dim = config.get("head_dim")
    heads = config.get("num_attention_heads")
    if head_dim and heads and head_dim * heads != config.get("hidden_size"):
        raise ValueError(f"head_dim {head_dim} x {heads} heads != hidden_size {config.get('hidden_size')}: vitx's "
                         "attention has heads of width hidden_size / num_attention_heads")
    size = config.get("image_size")
    return {"num_heads": heads, "norm_eps": config.get("layer_norm_eps", 1e-12), "act": HF_ACTIVATIONS[act],
            "image_size": size if isinstance(size, int) else None, "pool": "token"}


def _class_names(config: dict, num_classes: int) -> Optional[list[str]]:
    labels = config.get("id2label") or {}
    names = [labels.get(str(i), labels.get(i)) for i in range(num_classes)]
    if not num_classes or any(n is None for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None  # transformers' placeholder names say nothing
    return names


def _normalization(configs: dict) -> Optional[dict]:
    pre = configs.get("preprocessor_config.json") or {}
    mean, std = pre.get("image_mean"), pre.get("image_std")
    return {"mean": list(mean), "std": list(std)} if mean and std else None


def is_hf_vit_state(state: Any) -> bool:
    return isinstance(state, dict) and any(
        re.match(r"^(?:vit\.|deit\.)?embeddings\.patch_embeddings\.projection\.weight$", str(k)) for k in state)


@register_reader
def read_hf_vit(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """A transformers ViT/DeiT folder (or its bare state dict) -> CheckpointInfo(source="hf-vit")."""
    if isinstance(contents, LoadedDirectory):
        config = contents.config or {}
        if config.get("model_type") not in MODEL_TYPES or not is_hf_vit_state(contents.state_dict):
            return None
        hf_state, configs = contents.state_dict, contents.configs
    elif is_hf_vit_state(contents) and all(isinstance(v, torch.Tensor) for v in contents.values()):
        config, hf_state, configs = {}, contents, {}
    else:
        return None
    state = convert_hf_state_dict(hf_state, path)
    notes = []
    if "dist_token" in state and "head.weight" in state and "head_dist.weight" not in state:
        state["reg_token"] = state.pop("dist_token")  # DeiTForImageClassification: only the class token is read
        notes.append("the distillation token, which no head of DeiTForImageClassification reads, is imported as a "
                     "register token")
    hints = hints_from_hf_config(config) if config else {"norm_eps": 1e-12}
    cfg, state, more = vit_config_from_state(state, path, hints)
    return CheckpointInfo(path=path, source="hf-vit", family="vit", config=cfg, state_dict=state,
                          normalization=_normalization(configs), class_names=_class_names(config, cfg.num_classes),
                          notes=notes + more)
