"""Supervised image classification with a ResNet (He et al. 2016): the convolutional teacher of DeiT.

The same task as the ViT's (`ImageClassifier`): uint8 batches normalised and flipped on the accelerator,
label-smoothed cross-entropy, AdamW with warm-up and cosine, top-1/top-5 accuracy; only the network differs. Its
checkpoints store the ResNet's configuration under `resnet`, so `DistillationClassifier(teacher_ckpt=...)` can
rebuild the network from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from data_pipelines.streaming import IGNORE_INDEX
from vit_experiments.models.pretrained import read_state_dict
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.tasks.classification import ImageClassifier
from vit_experiments.tasks.optim import OptimConfig


def load_resnet_weights(model: ResNet, path: str) -> list[str]:
    """Load a ResNet state dict in the common layout (a vitx checkpoint or a plain `torch.save`d state dict, e.g.
    one written by another code base) by name. A classifier of another shape is dropped and restarted from zero;
    every other key must match."""
    state = read_state_dict(path)
    notes = []
    own = model.state_dict()
    if any(k in state and state[k].shape != own[k].shape for k in ("fc.weight", "fc.bias")):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model.reset_classifier(model.cfg.num_classes)
        notes.append("fc dropped: the checkpoint's label set differs; a zero-initialised classifier is trained")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (notes and k.startswith("fc."))]
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit this ResNet: missing {missing[:8]}, unexpected {unexpected[:8]}. "
            "Check depth, base_width and stem against the checkpoint's."
        )
    return notes


class CNNClassifier(ImageClassifier):
    """A ResNet trained exactly like the ViT classifier (the steps, metrics and optimiser are ImageClassifier's).

    Args:
        resnet: the architecture (depth, stem, base width), its image size and number of classes.
        optim: learning rate, weight decay and schedule.
        label_smoothing: the smoothing of the one-hot target (0 to turn it off).
        hflip: flip training images left-right with probability 0.5 (on the accelerator).
        mean: per-channel mean of the images scaled to [0, 1], for normalisation; by default the data module's
            (its `normalization` preset), else ImageNet's. Saved in the checkpoint: a student feeds its teacher
            with it.
        std: per-channel standard deviation, likewise.
        init_from: weights to start from: a vitx checkpoint or a ResNet state dict in the common layout.
    """

    def __init__(
        self,
        resnet: ResNetConfig,
        optim: OptimConfig = OptimConfig(),
        label_smoothing: float = 0.1,
        hflip: bool = True,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
    ) -> None:
        # ImageClassifier.__init__ builds a ViT; this sets the same attributes around a ResNet instead
        L.LightningModule.__init__(self)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if resnet.num_classes < 2:
            raise ValueError(f"resnet.num_classes must be >= 2 for classification, got {resnet.num_classes}")
        # plain types only, so checkpoints load with torch.load(weights_only=True); `_class_path` lets
        # `vitx validate --ckpt_path` rebuild the task from the checkpoint's own hyperparameters
        self.save_hyperparameters(
            {
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "resnet": asdict(resnet),
                "optim": asdict(optim),
                "label_smoothing": label_smoothing,
                "hflip": hflip,
                "mean": list(mean) if mean else None,
                "std": list(std) if std else None,
                "init_from": init_from,
            }
        )
        self.optim_cfg = optim
        self.label_smoothing = label_smoothing
        self.hflip = hflip
        self.mean = tuple(mean) if mean else None  # resolved from the data module in setup() when None
        self.std = tuple(std) if std else None
        self.model = ResNet(resnet)
        self.init_notes: list[str] = load_resnet_weights(self.model, init_from) if init_from else []
        n = resnet.num_classes
        # validation under data parallelism pads the last batches with IGNORE_INDEX labels: metrics skip them
        self.train_acc1 = MulticlassAccuracy(n, top_k=1, average="micro")
        self.val_loss = MeanMetric()
        self.val_acc1 = MulticlassAccuracy(n, top_k=1, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc5 = MulticlassAccuracy(n, top_k=min(5, n), average="micro", ignore_index=IGNORE_INDEX)

    def analysis_backbone(self):
        """None: the attention analyses do not apply to a convolutional network."""
        return None
