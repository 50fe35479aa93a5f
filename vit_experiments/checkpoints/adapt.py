"""Load weights into a network of a possibly different configuration: fine-tuning (ViT paper, Sec. 3.2).

Keep the patch size, resample the position embedding by 2-D interpolation when the image size changes, and
replace a classifier whose label set differs (or every classifier, with `reset_head`) by a zero-initialised one,
so fine-tuning starts from uniform predictions on the pretrained features. Every other key must match.

The source may be any checkpoint read_checkpoint reads (a vitx run, timm / Hugging Face / big_vision ViT or DeiT
weights). What the weights' shapes do not show -- the attention heads, the activation, the LayerNorm epsilon --
is the model's own (its config): where the checkpoint's architecture names another value, a note says so.
"""

from __future__ import annotations

import math
from typing import Union

from torch import nn

from vit_experiments.checkpoints.info import CheckpointInfo, read_checkpoint
from vit_experiments.models.clip import CLIP
from vit_experiments.models.pos_embed import resample_abs_pos_embed
from vit_experiments.models.resnet import ResNet
from vit_experiments.models.vit import VisionTransformer


def _head_keys(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, ResNet):
        return ("fc.weight", "fc.bias")
    if isinstance(model, VisionTransformer):
        return ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
    return ()  # CLIP: the projections are part of the model, not a label set's classifier


def _vits(model: nn.Module) -> list[tuple[str, VisionTransformer]]:
    if isinstance(model, CLIP):
        return [("visual.", model.visual)]
    return [("", model)] if isinstance(model, VisionTransformer) else []


# ViT fields that change the function but not the shapes of the weights
_SILENT_FIELDS = ("num_heads", "act", "norm_eps", "pool")


def _architecture_notes(info: CheckpointInfo, model: nn.Module) -> list[str]:
    src = info.config.vision if hasattr(info.config, "vision") else info.config
    notes = []
    for prefix, vit in _vits(model):
        if src is None or not hasattr(src, "num_heads"):
            continue
        for f in _SILENT_FIELDS:
            theirs, ours = getattr(src, f), getattr(vit.cfg, f)
            if theirs != ours:
                notes.append(f"{prefix}{f}: the checkpoint's is {theirs!r}, this model's {ours!r} (the model's is "
                             "used; set it in the model's config if the checkpoint's is right)")
    return notes


def _resample(state: dict, prefix: str, vit: VisionTransformer, notes: list[str]) -> None:
    key = prefix + "pos_embed"
    target = vit.pos_embed.shape
    if key not in state or state[key].shape == target:
        return
    num_prefix = vit.cfg.num_prefix_tokens
    old_len = state[key].shape[1] - num_prefix
    old_side = math.isqrt(max(old_len, 0))
    if old_len <= 0 or old_side * old_side != old_len:
        raise ValueError(f"cannot resample {key} of {state[key].shape[1]} tokens to this model's {target[1]} "
                         f"({num_prefix} prefix token(s) + a square grid): do the prefix tokens match?")
    grid = vit.cfg.grid_size
    state[key] = resample_abs_pos_embed(state[key], grid, (old_side, old_side), num_prefix)
    notes.append(f"{key} resampled {old_side}x{old_side} -> {grid[0]}x{grid[1]}")


def load_weights(model: nn.Module, source: Union[str, CheckpointInfo], reset_head: bool = False,
                 trust: bool = False) -> list[str]:
    """Load `source` (a path or a CheckpointInfo) into `model`, adapting it as above. Returns notes on what
    changed; raises ValueError naming the keys that do not fit."""
    info = source if isinstance(source, CheckpointInfo) else read_checkpoint(str(source), trust=trust)
    state = dict(info.state_dict)
    own = model.state_dict()
    notes: list[str] = list(info.notes) + _architecture_notes(info, model)
    # published weights were trained with their own normalisation, which the task does not take from the file
    if info.normalization and info.source != "vitx":
        notes.append(f"the checkpoint was trained on images normalised with mean {info.normalization['mean']}, std "
                     f"{info.normalization['std']}: give the same (--model.mean, --model.std) unless the data's fit")
    for prefix, vit in _vits(model):
        _resample(state, prefix, vit, notes)
    heads = _head_keys(model)
    dropped = [k for k in heads if k in state and (reset_head or k not in own or state[k].shape != own[k].shape)]
    for key in dropped:
        del state[key]
    if dropped:
        model.reset_classifier(model.cfg.num_classes)  # zero-initialised
        why = "reset_head" if reset_head else "the checkpoint's label set differs"
        notes.append(f"{', '.join(dropped)} dropped ({why}): a zero-initialised classifier is trained instead")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in dropped]
    if missing or unexpected:
        raise ValueError(
            f"the weights in {info.path} do not fit this {type(model).__name__}: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}. Check that the size (variant, depth, width), patch size and prefix tokens match "
            "the checkpoint's")
    return notes
