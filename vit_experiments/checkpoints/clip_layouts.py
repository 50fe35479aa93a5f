"""CLIP's weights in the key layouts of other libraries, both ways: Hugging Face `transformers` and OpenAI/open_clip.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision". Every layout holds
the same network as vit_experiments.models.clip.CLIP; only names and a few shapes differ:

- Hugging Face (CLIPModel): `vision_model.embeddings.{class_embedding, patch_embedding, position_embedding}`,
  `vision_model.pre_layrnorm` (sic), `vision_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,
  layer_norm2, mlp.fc1, mlp.fc2}`, `vision_model.post_layernorm`, `visual_projection`; `text_model.embeddings.
  {token_embedding, position_embedding}`, `text_model.encoder.layers.N...`, `text_model.final_layer_norm`,
  `text_projection`; `logit_scale`. The projections are nn.Linear weights (E, width).
- OpenAI (openai/CLIP model.py) and open_clip (its ViT towers keep OpenAI's names): `visual.{conv1,
  class_embedding, positional_embedding, ln_pre, ln_post, proj}`, `visual.transformer.resblocks.N.{ln_1,
  attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`; `token_embedding`, `positional_embedding`,
  `transformer.resblocks.N...`, `ln_final`, `text_projection`; `logit_scale`. q, k, v are already fused (our
  qkv); the projections are matrices applied as x @ proj, (width, E): the transpose of ours.

Names map one to one (to_vitx_*, from_vitx_*); everything a layout holds that vitx's CLIP has no place for is
reported by the caller, never dropped silently.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

Renames = list[tuple[str, str]]


def _shift(replacement: str) -> str:
    """A block rule's group \\1 becomes \\2 under its tower's prefix, whose group 1 is the layer index."""
    return replacement.replace("\\1", "\\2")


# (pattern, vitx replacement) within one encoder layer, then with its tower's prefix
_HF_BLOCK = [
    (r"layer_norm1\.(weight|bias)", r"norm1.\1"),
    (r"layer_norm2\.(weight|bias)", r"norm2.\1"),
    (r"self_attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1"),
]
HF_RENAMES: Renames = [
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embed.proj.weight"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.norm_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.norm.\1"),
    (r"visual_projection\.weight", "image_projection.weight"),
    (r"text_model\.embeddings\.token_embedding\.weight", "text.token_embedding.weight"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"text.ln_final.\1"),
    (r"text_projection\.weight", "text.text_projection.weight"),
    (r"logit_scale", "logit_scale"),
] + [(rf"vision_model\.encoder\.layers\.(\d+)\.{a}", rf"visual.blocks.\1.{_shift(b)}") for a, b in _HF_BLOCK] \
  + [(rf"text_model\.encoder\.layers\.(\d+)\.{a}", rf"text.blocks.\1.{_shift(b)}") for a, b in _HF_BLOCK]

_OPENAI_BLOCK = [
    (r"ln_1\.(weight|bias)", r"norm1.\1"),
    (r"ln_2\.(weight|bias)", r"norm2.\1"),
    (r"attn\.in_proj_weight", "attn.qkv.weight"),
    (r"attn\.in_proj_bias", "attn.qkv.bias"),
    (r"attn\.out_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"mlp\.c_fc\.(weight|bias)", r"mlp.fc1.\1"),
    (r"mlp\.c_proj\.(weight|bias)", r"mlp.fc2.\1"),
]
OPENAI_RENAMES: Renames = [
    (r"visual\.conv1\.weight", "visual.patch_embed.proj.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"visual.norm_pre.\1"),
    (r"visual\.ln_post\.(weight|bias)", r"visual.norm.\1"),
    (r"token_embedding\.weight", "text.token_embedding.weight"),
    (r"ln_final\.(weight|bias)", r"text.ln_final.\1"),
    (r"logit_scale", "logit_scale"),
] + [(rf"visual\.transformer\.resblocks\.(\d+)\.{a}", rf"visual.blocks.\1.{_shift(b)}") for a, b in _OPENAI_BLOCK] \
  + [(rf"transformer\.resblocks\.(\d+)\.{a}", rf"text.blocks.\1.{_shift(b)}") for a, b in _OPENAI_BLOCK]


def _rename(state: dict[str, torch.Tensor], renames: Renames) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(renamed tensors, names no rule matched)."""
    out, left = {}, []
    for key, value in state.items():
        for pattern, replacement in renames:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = value
                break
        else:
            left.append(key)
    return out, left


# -- Hugging Face --------------------------------------------------------------------------------------------------
def to_vitx_hf(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A CLIPModel state dict -> (vitx CLIP state dict, keys with no place in it). q, k, v are fused into qkv."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for tower, ours in (("vision_model", "visual"), ("text_model", "text")):
        layers = sorted({int(m.group(1)) for k in state
                         if (m := re.match(rf"{tower}\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.weight$", k))})
        for i in layers:
            pre = f"{tower}.encoder.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                parts = [state.pop(f"{pre}{p}_proj.{kind}", None) for p in "qkv"]
                if all(p is not None for p in parts):
                    out[f"{ours}.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)  # (3 * width, ...) q, k, v
    cls = state.pop("vision_model.embeddings.class_embedding", None)
    if cls is not None:
        out["visual.cls_token"] = cls.reshape(1, 1, -1)  # (D,) -> (1, 1, D)
    pos = state.pop("vision_model.embeddings.position_embedding.weight", None)
    if pos is not None:
        out["visual.pos_embed"] = pos.unsqueeze(0)  # (T, D) -> (1, T, D)
    pos = state.pop("text_model.embeddings.position_embedding.weight", None)
    if pos is not None:
        out["text.positional_embedding"] = pos  # (T, W)
    # the position ids are buffers of the embedding modules, not weights
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    renamed, left = _rename(state, HF_RENAMES)
    return {**out, **renamed}, left


def from_vitx_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_vitx_hf: a vitx CLIP state dict in CLIPModel's names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"(visual|text)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if m:
            tower = "vision_model" if m.group(1) == "visual" else "text_model"
            for p, part in zip("qkv", value.chunk(3)):
                out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{p}_proj.{m.group(3)}"] = part.clone()
            continue
        if key == "visual.cls_token":
            out["vision_model.embeddings.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value[0]
        elif key == "text.positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        else:
            out[_invert(key, HF_RENAMES)] = value
    return {k: v.contiguous() for k, v in out.items()}


# -- OpenAI / open_clip ------------------------------------------------------------------------------------------
# buffers and constants some of these files carry besides the weights: OpenAI's TorchScript archives keep the
# input resolution, context length and vocabulary size as tensors; old open_clip saved the causal mask
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask")


def to_vitx_openai(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An OpenAI / open_clip state dict -> (vitx CLIP state dict, keys with no place in it)."""
    state = {k: v for k, v in state.items() if k not in OPENAI_EXTRAS}
    out: dict[str, torch.Tensor] = {}
    moves: dict[str, Callable[[torch.Tensor], tuple[str, torch.Tensor]]] = {
        "visual.class_embedding": lambda t: ("visual.cls_token", t.reshape(1, 1, -1)),  # (D,) -> (1, 1, D)
        "visual.positional_embedding": lambda t: ("visual.pos_embed", t.unsqueeze(0)),  # (T, D) -> (1, T, D)
        "visual.proj": lambda t: ("image_projection.weight", t.T.contiguous()),  # x @ (D, E) -> Linear (E, D)
        "positional_embedding": lambda t: ("text.positional_embedding", t),  # (T, W)
        "text_projection": lambda t: ("text.text_projection.weight", t.T.contiguous()),  # (W, E) -> (E, W)
    }
    for key, move in moves.items():
        if key in state:
            name, value = move(state.pop(key))
            out[name] = value
    renamed, left = _rename(state, OPENAI_RENAMES)
    return {**out, **renamed}, left


def from_vitx_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of to_vitx_openai: a vitx CLIP state dict in OpenAI's (and open_clip's) names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "visual.cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "visual.pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key == "image_projection.weight":
            out["visual.proj"] = value.T
        elif key == "text.positional_embedding":
            out["positional_embedding"] = value
        elif key == "text.text_projection.weight":
            out["text_projection"] = value.T
        else:
            out[_invert(key, OPENAI_RENAMES)] = value
    return {k: v.contiguous() for k, v in out.items()}


def _invert(key: str, renames: Renames) -> str:
    """The other layout's name of a vitx key, by running a rename table backwards."""
    for pattern, replacement in renames:
        m = re.fullmatch(_unescape_groups(replacement), key)
        if m:
            return _fill(pattern, m.groups())
    raise KeyError(f"{key} has no counterpart in this layout")


def _unescape_groups(replacement: str) -> str:
    """A replacement like r"visual.blocks.\\1.norm1.\\2" as a pattern matching vitx names, every group one
    dot-free part of the name: r"visual\\.blocks\\.([^.]+)\\.norm1\\.([^.]+)"."""
    parts = re.split(r"(\\\d)", replacement)
    return "".join(r"([^.]+)" if re.fullmatch(r"\\\d", p) else re.escape(p) for p in parts)


def _fill(pattern: str, groups: tuple[str, ...]) -> str:
    """The name a pattern like r"vision_model\\.encoder\\.layers\\.(\\d+)\\.layer_norm1\\.(weight|bias)" matches
    for these group values."""
    values = iter(groups)
    name = re.sub(r"\((?:[^()]|\([^()]*\))*\)", lambda _: next(values), pattern)
    return name.replace("\\.", ".")
