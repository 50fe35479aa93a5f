"""The architecture of a ViT from its weights: a ViTConfig read off the shapes of a state dict in vitx's (timm's)
key layout, with what a config file beside the weights says winning over the shapes.

Readers of other layouts (timm, Hugging Face, big_vision) rename the weights into vitx's layout first and then
call `vit_config_from_state`. What shapes cannot tell:

- the number of attention heads: from the config when it names one, else the known sizes (ViT-H/g/G: 16 heads),
  else the usual 64-wide heads (embed_dim // 64). The user overrides it with `--num-heads N` (vitx analyze),
  a `#num_heads=N` suffix on a checkpoint path (`--model.init_from`, `--model.teacher_ckpt`), or
  `read_checkpoint(path, num_heads=N)`; readers see it through `overrides()`;
- pooling when there is a class token and no fc_norm: the class token (timm's default), unless a config says
  "avg";
- the LayerNorm epsilon and activation: 1e-6 and the exact GELU (timm's and big_vision's ViTs) unless a config
  says otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from typing import Any, Iterator, Optional

import torch

from vit_experiments.models.vit import ViTConfig

# widths whose published models do not have 64-wide heads: ViT-H (1280), ViT-g (1408), ViT-G / bigG (1664)
KNOWN_HEADS = {1280: 16, 1408: 16, 1664: 16}
HEADS_HINT = ("set it: `vitx analyze --num-heads N`, a `#num_heads=N` suffix on the path given to "
              "--model.init_from or --model.teacher_ckpt, or read_checkpoint(path, num_heads=N)")

_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("vitx_checkpoint_overrides", default={})
OVERRIDABLE = ("num_heads",)


@contextlib.contextmanager
def overriding(**values: Any) -> Iterator[None]:
    """Within the block, readers use these values (None: not given) instead of what they would infer; values set
    by an enclosing block stay unless given again."""
    token = _OVERRIDES.set({**_OVERRIDES.get(), **{k: v for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def overrides() -> dict:
    """What the user set for the checkpoint being read (e.g. {"num_heads": 12})."""
    return dict(_OVERRIDES.get())


def split_path_options(path: str) -> tuple[str, dict]:
    """"model.pth#num_heads=6" -> ("model.pth", {"num_heads": 6}); a path without '#' is returned as it is."""
    base, sep, opts = str(path).rpartition("#")
    if not sep or not re.fullmatch(r"\w+=\w+(,\w+=\w+)*", opts):
        return str(path), {}
    options = {}
    for item in opts.split(","):
        key, value = item.split("=")
        if key not in OVERRIDABLE:
            raise ValueError(f"unknown checkpoint option {key!r} in {path}; valid: {', '.join(OVERRIDABLE)}")
        if not value.isdigit() or int(value) <= 0:
            raise ValueError(f"{key} must be a positive integer in {path}, got {value!r}")
        options[key] = int(value)
    return base, options


def infer_num_heads(embed_dim: int, path: str, from_config: Optional[int] = None) -> tuple[int, Optional[str]]:
    """(heads, a note saying how they were chosen or None when a config or the user named them)."""
    given = overrides().get("num_heads")
    if given is not None:
        if embed_dim % given:
            raise ValueError(f"num_heads={given} does not divide the width {embed_dim} of {path}; pick a divisor")
        return given, None
    if from_config:
        return int(from_config), None
    if embed_dim in KNOWN_HEADS:
        return KNOWN_HEADS[embed_dim], f"num_heads={KNOWN_HEADS[embed_dim]} (the published models of width {embed_dim})"
    if embed_dim % 64 == 0:
        heads = embed_dim // 64
        return heads, f"num_heads={heads} inferred (64-wide heads: width {embed_dim} // 64); {HEADS_HINT} otherwise"
    raise ValueError(f"cannot infer the number of attention heads of {path} (width {embed_dim} is not a multiple of "
                     f"64 and no config names it); {HEADS_HINT}")


def _square(n: int) -> Optional[int]:
    side = math.isqrt(n) if n > 0 else 0
    return side if side * side == n and side > 0 else None


def vit_config_from_state(state: dict[str, torch.Tensor], path: str, hints: Optional[dict] = None
                          ) -> tuple[ViTConfig, dict[str, torch.Tensor], list[str]]:
    """A state dict in vitx's layout -> (ViTConfig, the state dict ready for it, notes on what was inferred).

    `hints` (from a config file) may name: num_heads, image_size, pool ("token"/"avg"), norm_eps, act, num_classes.
    A position embedding without prefix entries (timm's no_embed_class) gets zero entries for them (no change to
    the outputs). Raises ValueError naming what is missing or cannot be inferred."""
    hints = {k: v for k, v in (hints or {}).items() if v is not None}
    notes: list[str] = []
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"{path}: cannot infer the ViT's architecture without {key}")
    proj = state["patch_embed.proj.weight"]  # (D, C, P, P)
    if proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise ValueError(f"{path}: patch_embed.proj.weight has shape {tuple(proj.shape)}; vitx's ViT needs square "
                         "patches (D, C, P, P)")
    dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token, dist = "cls_token" in state, int("dist_token" in state)
    regs = state["reg_token"].shape[1] if "reg_token" in state else 0
    prefix = int(class_token) + dist + regs
    state = dict(state)
    pos = state["pos_embed"]  # (1, [prefix +] N, D)
    length = pos.shape[1]
    side = _square(length - prefix)
    if side is None and prefix and _square(length):  # timm's no_embed_class: the prefix tokens get no position
        side = _square(length)
        state["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, dim), pos], dim=1)  # (1, prefix + N, D)
        notes.append(f"pos_embed has no entries for the {prefix} prefix token(s) (no_embed_class): zeros added")
    if side is None:
        raise ValueError(f"{path}: pos_embed holds {length} positions, which is neither {prefix} prefix token(s) "
                         "plus a square grid of patches nor a square grid alone; vitx's ViT needs square images")
    image_size = side * patch
    if hints.get("image_size") and int(hints["image_size"]) != image_size:
        raise ValueError(f"{path}: its config says image_size {hints['image_size']}, but pos_embed holds a "
                         f"{side}x{side} grid of {patch}-px patches ({image_size} px)")
    heads, note = infer_num_heads(dim, path, hints.get("num_heads"))
    if note:
        notes.append(note)
    if "fc_norm.weight" in state:
        pool = "avg"
    elif not class_token:
        pool = "avg"
    else:
        pool = hints.get("pool", "token")
    head = state.get("head.weight")
    cfg = ViTConfig(
        variant=None, image_size=image_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], in_chans=in_chans,
        num_classes=head.shape[0] if head is not None else 0, pool=pool, class_token=class_token,
        num_distill_tokens=dist, num_reg_tokens=regs, fc_norm="fc_norm.weight" in state,
        qkv_bias="blocks.0.attn.qkv.bias" in state, norm_eps=float(hints.get("norm_eps", 1e-6)),
        pre_norm="norm_pre.weight" in state, patch_bias="patch_embed.proj.bias" in state,
        act=hints.get("act", "gelu"),
    )
    check_fits(cfg, state, path)
    return cfg, state, notes


def check_fits(cfg: ViTConfig, state: dict[str, torch.Tensor], path: str) -> None:
    """Raise ValueError naming the weights that a VisionTransformer(cfg) has no place for, lacks, or would shape
    differently (e.g. layer scale, q/k norms, an attention-pooling head: parts vitx's ViT does not have)."""
    from vit_experiments.models.vit import VisionTransformer

    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn
        own = {k: v.shape for k, v in VisionTransformer(cfg).state_dict().items()}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k])})" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k])]
    if unexpected or missing or wrong:
        raise ValueError(
            f"{path}: these weights do not fit a vitx ViT ({cfg.depth} blocks, width {cfg.embed_dim}, "
            f"{cfg.num_heads} heads): unexpected {unexpected[:8]}, missing {missing[:8]}, other shapes {wrong[:4]}. "
            "Parts vitx's ViT does not have (layer scale, q/k norm, attention pooling, SwiGLU) cannot be imported")
