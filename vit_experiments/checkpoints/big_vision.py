"""Reader for ViT checkpoints of Google's JAX code bases: big_vision and the original vision_transformer / AugReg
releases (Dosovitskiy et al. 2021; Steiner et al. 2022, "How to train your ViT?"), saved as .npz.

The arrays are named by Flax module path, optionally under "params/", "params/img/" or "opt/target/":
embedding/kernel (P, P, C, D: HWIO), cls (1, 1, D), the position embedding (AugReg:
Transformer/posembed_input/pos_embedding, (1, 1 + N, D); big_vision: pos_embedding, (1, N, D), none for the class
token), Transformer/encoderblock_{i}/ (big_vision's scanned models: Transformer/encoderblock/ with the layer as
the first axis) with LayerNorm_0, MultiHeadDotProductAttention_{1|0}/{query,key,value} (kernel (D, heads,
head_dim), bias (heads, head_dim)) and out (kernel (heads, head_dim, D)), LayerNorm_{2|1}, MlpBlock_{3|0}/Dense_0
and Dense_1 (kernels (in, out), transposed for torch), Transformer/encoder_norm, head (kernel (D, K)).

The heads are read off the query kernel. A model without `cls` is average-pooled (big_vision's "gap": the
encoder norm on every token, then the mean). The MLP activation is the tanh-approximated GELU ("gelu_tanh"),
jax.nn.gelu's default, with which these models were trained. A `pre_logits` layer (the tanh representation
layer of ImageNet-21k pretraining) has no place in vitx's ViT: it is dropped with the head, leaving the
backbone (num_classes=0). An attention-pooling (MAP) head cannot be imported.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from vit_experiments.checkpoints.infer import vit_config_from_state
from vit_experiments.checkpoints.info import CheckpointInfo, register_reader

PREFIXES = ("", "params/", "params/img/", "opt/target/")


def _prefix(arrays: dict) -> Optional[str]:
    for p in PREFIXES:
        if f"{p}embedding/kernel" in arrays:
            return p
    return None


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def convert_big_vision(w: dict, path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """JAX arrays (as read from the .npz) -> (vitx state dict, notes)."""
    p = _prefix(w)
    if any(k.startswith(f"{p}MAPHead_0/") for k in w):
        raise ValueError(f"{path} has an attention-pooling (MAP) head, which vitx's ViT does not have; only class-"
                         "token and average-pooled models can be imported")
    big_vision = p.startswith("params/") or f"{p}pos_embedding" in w or \
        f"{p}Transformer/encoderblock/LayerNorm_0/scale" in w
    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    scanned = f"{p}Transformer/encoderblock/LayerNorm_0/scale" in w
    state: dict[str, torch.Tensor] = {}
    kernel = w[f"{p}embedding/kernel"]  # (P, P, C, D)
    if kernel.ndim != 4:
        raise ValueError(f"{path}: embedding/kernel has shape {kernel.shape}; expected a (P, P, C, D) convolution")
    state["patch_embed.proj.weight"] = _t(kernel.transpose(3, 2, 0, 1))  # (D, C, P, P)
    if f"{p}embedding/bias" in w:
        state["patch_embed.proj.bias"] = _t(w[f"{p}embedding/bias"])
    if f"{p}cls" in w:
        state["cls_token"] = _t(w[f"{p}cls"]).reshape(1, 1, -1)
    pos_key = f"{p}pos_embedding" if f"{p}pos_embedding" in w else f"{p}Transformer/posembed_input/pos_embedding"
    if pos_key not in w:
        raise ValueError(f"{path}: no position embedding ({p}pos_embedding or "
                         f"{p}Transformer/posembed_input/pos_embedding); vitx's ViT needs a learned one")
    dim = kernel.shape[3]
    state["pos_embed"] = _t(w[pos_key]).reshape(1, -1, dim)  # (1, [1 +] N, D)
    if scanned:
        depth = w[f"{p}Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = sum(1 for k in w if k.startswith(f"{p}Transformer/encoderblock_") and k.endswith("/LayerNorm_0/scale"))
    for i in range(depth):
        base = f"{p}Transformer/encoderblock/" if scanned else f"{p}Transformer/encoderblock_{i}/"

        def get(name: str) -> np.ndarray:
            a = w[base + name]
            return a[i] if scanned else a

        att = f"MultiHeadDotProductAttention_{mha}/"
        b = f"blocks.{i}."
        state[b + "norm1.weight"], state[b + "norm1.bias"] = _t(get("LayerNorm_0/scale")), _t(get("LayerNorm_0/bias"))
        # (D, heads, head_dim) kernels -> (heads*head_dim, D) torch weights, stacked q, k, v: (3D, D)
        state[b + "attn.qkv.weight"] = torch.cat(
            [_t(get(f"{att}{n}/kernel")).flatten(1).T for n in ("query", "key", "value")])
        if base + f"{att}query/bias" in w:
            state[b + "attn.qkv.bias"] = torch.cat(
                [_t(get(f"{att}{n}/bias")).reshape(-1) for n in ("query", "key", "value")])  # (3D,)
        out = _t(get(f"{att}out/kernel"))  # (heads, head_dim, D)
        state[b + "attn.proj.weight"] = out.reshape(-1, out.shape[-1]).T  # (D, heads*head_dim)
        state[b + "attn.proj.bias"] = _t(get(f"{att}out/bias"))
        state[b + "norm2.weight"] = _t(get(f"LayerNorm_{ln2}/scale"))
        state[b + "norm2.bias"] = _t(get(f"LayerNorm_{ln2}/bias"))
        for r in range(2):
            state[b + f"mlp.fc{r + 1}.weight"] = _t(get(f"MlpBlock_{mlp}/Dense_{r}/kernel")).T  # (out, in)
            state[b + f"mlp.fc{r + 1}.bias"] = _t(get(f"MlpBlock_{mlp}/Dense_{r}/bias"))
    state["norm.weight"] = _t(w[f"{p}Transformer/encoder_norm/scale"])
    state["norm.bias"] = _t(w[f"{p}Transformer/encoder_norm/bias"])
    notes = []
    if f"{p}pre_logits/kernel" in w:
        notes.append("pre_logits (a representation layer vitx's ViT does not have) and the head after it dropped: "
                     "backbone only (num_classes=0)")
    elif f"{p}head/kernel" in w and w[f"{p}head/kernel"].size:
        state["head.weight"] = _t(w[f"{p}head/kernel"]).T  # (K, D)
        state["head.bias"] = _t(w[f"{p}head/bias"])
    return state, notes


def _heads(w: dict) -> Optional[int]:
    p = _prefix(w)
    for k, a in w.items():
        if k.startswith(f"{p}Transformer/encoderblock") and k.endswith("query/kernel"):
            return int(a.shape[-2])  # (..., D, heads, head_dim)
    return None


@register_reader
def read_big_vision(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """big_vision / AugReg .npz arrays -> CheckpointInfo(source="big_vision")."""
    if not isinstance(contents, dict) or _prefix(contents) is None \
            or not all(isinstance(v, np.ndarray) for v in contents.values()):
        return None
    try:
        state, notes = convert_big_vision(contents, path)
    except KeyError as err:
        raise ValueError(f"{path} looks like a big_vision ViT but lacks {err}: is it a ViT checkpoint, and "
                         "complete?") from err
    heads = _heads(contents)
    cfg, state, more = vit_config_from_state(state, path, {"num_heads": heads, "act": "gelu_tanh", "norm_eps": 1e-6})
    return CheckpointInfo(path=path, source="big_vision", family="vit", config=cfg, state_dict=state,
                          notes=notes + more)
