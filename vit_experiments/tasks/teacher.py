"""DeiT's teacher: a trained classifier used as a fixed function (Touvron et al. 2021, Sec. 5.1 "the teacher sees
the image at its own resolution").

Any classifier checkpoint that vit_experiments.checkpoints can read (a vitx ViT, ResNet or DeiT; ViT or DeiT
weights of timm, Hugging Face or big_vision, with a `#num_heads=N` suffix on the path where the heads cannot be
inferred) is rebuilt from the file alone, frozen, kept in eval mode for good, and fed the student's (augmented, mixed) images converted to
its own normalisation and resolution.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD
from vit_experiments.checkpoints import read_checkpoint
from vit_experiments.checkpoints.infer import split_path_options
from vit_experiments.checkpoints.io import is_remote


class FrozenTeacher(nn.Module):
    """A trained classifier as a fixed function: eval mode whatever its parent does, no parameter trains,
    inputs converted from the student's normalisation and resolution to its own.

    Args:
        model: the classifier; maps (B, 3, S, S) images normalised with (mean, std) to (B, K) logits.
        image_size: S, the resolution it was trained at.
        mean, std: its normalisation.
        in_mean, in_std: the normalisation of the images it will be given (the student's); or later, with
            `set_input_normalization`.
    """

    def __init__(self, model: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float],
                 in_mean: Optional[Sequence[float]] = None, in_std: Optional[Sequence[float]] = None):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        # x_teacher = x_student * scale + shift per channel; not saved: derived from the normalisations
        self.register_buffer("scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.input_normalization_set = False
        if in_mean is not None and in_std is not None:
            self.set_input_normalization(in_mean, in_std)
        self.train(False)

    @property
    def num_classes(self) -> int:
        return self.model.cfg.num_classes

    def set_input_normalization(self, in_mean: Sequence[float], in_std: Sequence[float]) -> None:
        """The images will arrive as (x / 255 - in_mean) / in_std: x_teacher = (x_student * in_std + in_mean -
        mean) / std."""
        m, s = torch.tensor(self.mean), torch.tensor(self.std)
        in_m, in_s = torch.tensor(tuple(in_mean)), torch.tensor(tuple(in_std))
        with torch.no_grad():
            self.scale.copy_((in_s / s).view(1, -1, 1, 1))
            self.shift.copy_(((in_m - m) / s).view(1, -1, 1, 1))
        self.input_normalization_set = True

    def train(self, mode: bool = True):
        """Stays in eval mode: BatchNorm statistics and dropout of a teacher never change (Lightning calls
        .train() on the whole module at the start of every training epoch and after every validation)."""
        return super().train(False)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised (B, 3, H, W) -> teacher-normalised (B, 3, S, S)."""
        if not self.input_normalization_set:
            raise RuntimeError("the teacher does not know the normalisation of its input: set_input_normalization")
        x = images * self.scale + self.shift  # (B, 3, H, W)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            down = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=down)  # (B, 3, S, S)
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.adapt(images))  # (B, K)


def teacher_exists(path: str | Path) -> bool:
    """Whether the teacher's checkpoint (a file, a folder, or a remote path: tried when read) is there."""
    local = split_path_options(str(path))[0]
    return is_remote(local) or Path(local.removeprefix("file://")).exists()


def load_teacher(path: str | Path, in_mean: Optional[Sequence[float]] = None,
                 in_std: Optional[Sequence[float]] = None, trust: bool = False) -> FrozenTeacher:
    """A FrozenTeacher from a classifier checkpoint: architecture, weights and normalisation from the file
    (ImageNet's normalisation when it names none). Notes on what was inferred from imported weights are
    printed."""
    if not teacher_exists(path):
        raise FileNotFoundError(
            f"teacher checkpoint not found: {path}. Train one first, e.g. `make teacher` "
            "(vitx fit --config conf/cnn/teacher-shapes.yaml), and point teacher_ckpt at its last.ckpt.")
    info = read_checkpoint(str(path), trust=trust)
    if info.config is None or info.family == "clip":
        raise ValueError(f"{path} is not a classifier checkpoint vitx can rebuild ({info.describe()}); a teacher is "
                         "a checkpoint written by `vitx fit` with ImageClassifier or DistillationClassifier")
    model = info.build()
    for note in info.notes:
        print(f"vitx: teacher {path}: {note}", file=sys.stderr)
    norm = info.normalization or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return FrozenTeacher(model, model.cfg.image_size, norm["mean"], norm["std"], in_mean, in_std)
