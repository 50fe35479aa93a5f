"""Load pretrained weights from a local file into a VisionTransformer, adapting them to its configuration.

Fine-tuning as in the ViT paper (Sec. 3.2): keep the patch size, resample the position embedding by 2-D
interpolation when the image size changes, and replace the classification head by a zero-initialised one when
the label set changes. Nothing is downloaded: the file is a vitx/Lightning checkpoint (`state_dict` under
`model.`) or a plain state dict in the common ViT layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .pos_embed import resample_abs_pos_embed

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def saved_normalization(hparams: dict) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """The per-channel (mean, std) a vitx task was trained with, from its checkpoint's `hyper_parameters`.

    The ViT and CNN classifiers keep the statistics they resolved (from the data module when given none) in
    `pixel_mean`/`pixel_std`; the DeiT task, and the CNN task's explicit arguments, in `mean`/`std`. None where
    the checkpoint names none.
    """
    return (hparams.get("pixel_mean") or hparams.get("mean"), hparams.get("pixel_std") or hparams.get("std"))


def read_state_dict(path: str | Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model weights in `path`: a Lightning checkpoint (keys under `prefix` are kept, prefix removed) or a
    plain state dict saved with torch.save."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found: {path}. Point init_from at a checkpoint, for example "
            "runs/vit-pretrain/version_0/checkpoints/last.ckpt (written by `make pretrain`)."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path} holds no weights under the prefix {prefix!r}")
    return state


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, reset_head: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make `state` fit `model`: resample `pos_embed` to the model's grid and drop heads whose shape differs, or
    all heads with `reset_head` (the model keeps its own, zero-initialised, head). Returns the adapted state and
    notes on what changed."""
    target = model.state_dict()
    state = dict(state)
    notes = []
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        num_prefix = model.cfg.num_prefix_tokens
        old_len = state["pos_embed"].shape[1] - num_prefix
        old_side = math.isqrt(old_len)
        if old_side * old_side != old_len:
            raise ValueError(
                f"cannot resample a position embedding of {old_len} patch tokens: not a square grid"
            )
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], model.cfg.grid_size, (old_side, old_side), num_prefix
        )
        notes.append(f"pos_embed resampled {old_side}x{old_side} -> {model.cfg.grid_size[0]}x{model.cfg.grid_size[1]}")
    for key in HEAD_KEYS:
        if key in state and (reset_head or key not in target or state[key].shape != target[key].shape):
            del state[key]
            notes.append(f"{key} dropped: the model's zero-initialised head is trained instead")
    return state, notes


def load_pretrained(model: nn.Module, path: str | Path, reset_head: bool = False) -> list[str]:
    """Load `path` into `model` with `adapt_state_dict`; every other key must match exactly."""
    state, notes = adapt_state_dict(read_state_dict(path), model, reset_head)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if any("dropped" in n for n in notes):
        model.reset_classifier(model.cfg.num_classes)  # zero-initialised: fine-tuning starts from the pretrained features
    missing = [k for k in missing if k not in HEAD_KEYS]
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}. "
            "Check that the variant, patch size and number of prefix tokens match the checkpoint's."
        )
    return notes
