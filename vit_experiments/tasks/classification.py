"""Supervised image classification: a Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words") pretrained from scratch or fine-tuned at a new resolution or label set, or a ResNet (He et al. 2016), the
convolutional teacher of DeiT. One task over either backbone: the steps, metrics and optimiser do not depend on it.

The batch arrives as uint8 images; normalisation and flips happen on the accelerator, batch-wise (the task core),
so the CPU workers only decode and crop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from data_pipelines.constants import IGNORE_INDEX
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.tasks.core import VisionTask, as_config
from vit_experiments.tasks.optim import OptimConfig


def accuracy(num_classes: int, top_k: int = 1) -> MulticlassAccuracy:
    """Micro accuracy that skips the padding (IGNORE_INDEX labels) of the last batches under data parallelism.

    Without torchmetrics' per-update argument checks: they count the distinct labels of every batch
    (torch.unique), a host synchronisation in each training step on a GPU. The values are the same; the label set
    is checked once against the data by the task core (check_datamodule)."""
    return MulticlassAccuracy(num_classes, top_k=min(top_k, num_classes), average="micro", ignore_index=IGNORE_INDEX,
                              validate_args=False)


class ImageClassifier(VisionTask):
    """A ViT or a ResNet trained with label-smoothed cross-entropy, AdamW and warm-up + cosine.

    Args:
        vit: a ViT backbone (a variant such as "Ti/16" plus any overrides, image size, number of classes).
        resnet: a ResNet backbone instead (depth, stem, base width, image size, number of classes). Give one.
        optim: learning rate, weight decay, schedule and layer decay.
        label_smoothing: the smoothing of the one-hot target (0.1 in DeiT; 0 to turn it off).
        hflip: flip training images left-right with probability 0.5 (on the accelerator).
        mean: per-channel mean of [0, 1] pixels; by default a checkpoint's, else the data module's preset, else
            ImageNet's. Saved in every checkpoint.
        std: per-channel standard deviation, likewise.
        init_from: a checkpoint to start from (fine-tuning): position embedding resampled to the image size, a
            classifier of another label set replaced by a zero-initialised one.
        reset_head: with init_from, start from a zero-initialised classifier even when the label set is the same.
    """

    def __init__(
        self,
        vit: Optional[ViTConfig] = None,
        resnet: Optional[ResNetConfig] = None,
        optim: OptimConfig = OptimConfig(),
        label_smoothing: float = 0.1,
        hflip: bool = True,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
        reset_head: bool = False,
    ) -> None:
        super().__init__(optim, mean, std)
        if (vit is None) == (resnet is None):
            raise ValueError("give the classifier one backbone: vit (a ViTConfig) or resnet (a ResNetConfig)")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        vit, resnet = as_config(ViTConfig, vit), as_config(ResNetConfig, resnet)
        backbone = vit or resnet
        if backbone.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for classification, got {backbone.num_classes}")
        self.save_task_hyperparameters(vit=vit, resnet=resnet, optim=self.optim_cfg, label_smoothing=label_smoothing,
                                       hflip=hflip, mean=mean, std=std, init_from=init_from, reset_head=reset_head)
        self.label_smoothing, self.hflip = label_smoothing, hflip
        self.model = VisionTransformer(vit) if vit is not None else ResNet(resnet)
        self.init_weights_from(init_from, reset_head)

        n = backbone.num_classes
        self.train_acc1 = accuracy(n)
        self.val_loss = MeanMetric()
        self.val_acc1, self.val_acc5 = accuracy(n), accuracy(n, 5)

    def analysis_backbone(self) -> Optional[VisionTransformer]:
        return self.model if isinstance(self.model, VisionTransformer) else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, num_classes)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self.model(images)  # (B, num_classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc1(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, prog_bar=True)
        return loss

    def evaluate(self, batch, stage: str) -> None:
        images, labels = batch[0], batch[1]
        logits = self.model(images)  # (B, num_classes)
        real = labels != IGNORE_INDEX
        self.val_loss(F.cross_entropy(logits[real].float(), labels[real], reduction="none"))
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)
