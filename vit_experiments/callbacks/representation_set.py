"""The labelled representation set of AttentionAnalysis: validation images (and their labels) for CKA and probes.

Gathered once, on rank 0, from the validation batches the task already sees (after its batch transfer, so
normalised as the model sees them), then fixed for the run and kept in the checkpoint. Stored as uint8 when the
module can undo its normalisation (mean/std per channel: exact for uint8 data, a quarter of float32's memory:
256 images of 224 px are 38 MB) and normalised again for each analysis; as float otherwise.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from data_pipelines.transforms import normalize


def display_images(pl_module: Any, images: torch.Tensor) -> Optional[torch.Tensor]:
    """Undo the module's normalisation for drawing, when it exposes `mean` and `std` (per channel, in [0, 1])."""
    mean, std = getattr(pl_module, "mean", None), getattr(pl_module, "std", None)
    try:
        m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)  # (1, C, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    except (TypeError, ValueError, RuntimeError):
        return None
    if m.shape[1] != images.shape[1] or s.shape[1] != images.shape[1]:
        return None
    return ((images.float() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)  # (B, C, H, W)


def labelled_images(batch: Any) -> Tuple[Any, Optional[torch.Tensor]]:
    """(images, labels or None) of a validation batch: labels when the second entry is one integer class per image
    (classification, DeiT), None otherwise (CLIP's token ids are (B, L)). The padding of evaluation under data
    parallelism is left out: images with a negative label (IGNORE_INDEX), or outside CLIP's `valid` mask."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
    valid = batch[2] if isinstance(batch, (tuple, list)) and len(batch) > 2 else None
    if isinstance(valid, torch.Tensor) and valid.dtype == torch.bool and valid.shape == (len(images),):
        return images[valid], None  # (images, token ids, valid): CLIP
    if not (isinstance(labels, torch.Tensor) and isinstance(images, torch.Tensor) and labels.ndim == 1
            and len(labels) == len(images) and not labels.is_floating_point() and labels.dtype != torch.bool):
        return images, None
    keep = labels >= 0
    return images[keep], labels[keep].long()


class RepresentationSet:
    """Up to `size` validation images with their labels, gathered over one validation pass (size 0: off).

    gather(module, batch) per validation batch; restart() when a pass begins (a pass starts from the first batch
    again, so the images of an unfinished sanity check would only repeat); freeze() at the end of a pass, or by
    itself once `size` images are in; prepared(module) for each analysis.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.images: Optional[torch.Tensor] = None  # (M, C, H, W) uint8, or float normalised; None until frozen
        self.labels: Optional[torch.Tensor] = None  # (M,) int64 class indices, or None (e.g. CLIP)
        self._parts: list = []  # (images, labels or None) of the pass being gathered

    @property
    def frozen(self) -> bool:
        return self.images is not None

    def restart(self) -> None:
        self._parts = []

    def gather(self, pl_module: Any, batch: Any) -> None:
        if self.frozen or not self.size:
            return
        images, labels = labelled_images(batch)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            return  # not an image batch the model takes as is
        need = self.size - sum(len(x) for x, _ in self._parts)
        images = images[:need].detach().float().cpu()
        if len(images):
            stored = display_images(pl_module, images)
            self._parts.append((images.clone() if stored is None else stored,
                                None if labels is None else labels[:need].cpu()))
        if need <= len(images):
            self.freeze()

    def freeze(self) -> None:
        if not self.frozen and self._parts:
            self.images = torch.cat([x for x, _ in self._parts])
            labels = [y for _, y in self._parts]
            self.labels = None if any(y is None for y in labels) else torch.cat(labels)
        self._parts = []

    def prepared(self, pl_module: Any) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[int]]:
        """(images normalised for the model, labels, num_classes) for analyze_model; Nones until frozen.
        num_classes is the module's label-set size, or None (counted from the labels) where it has none."""
        if not self.frozen:
            return None, None, None
        images = self.images
        if images.dtype == torch.uint8:
            images = normalize(images, pl_module.mean, pl_module.std)  # what display_images undid
        classes = getattr(pl_module, "num_classes", None)
        classes = classes() if callable(classes) else classes
        if self.labels is None or not isinstance(classes, int) or classes < 2 or int(self.labels.max()) >= classes:
            classes = None
        return images, self.labels, classes

    def state_dict(self) -> Dict[str, Any]:
        return {"representation": self.images, "representation_labels": self.labels}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("representation") is not None and self.size:
            self.images = state["representation"][: self.size]
            labels = state.get("representation_labels")
            self.labels = None if labels is None else labels[: self.size]
