"""Supervised image classification with a Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"): pretraining from scratch and fine-tuning a checkpoint at a new resolution or label set.

The batch arrives as uint8 images; normalisation and flips happen here, on the accelerator, batch-wise, so the
CPU workers only decode and crop.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from data_pipelines.streaming import IGNORE_INDEX
from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_hflip
from vit_experiments.models.pretrained import load_pretrained
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.scaling import FullyShardable
from vit_experiments.tasks.optim import OptimConfig, build_optimizer


class ImageClassifier(FullyShardable, L.LightningModule):
    """A ViT trained with cross-entropy, AdamW and warm-up + cosine.

    Args:
        vit: the architecture (a variant such as "Ti/16" plus any overrides, image size and number of classes).
        optim: learning rate, weight decay and schedule.
        label_smoothing: the smoothing of the one-hot target (0.1 in DeiT; 0 to turn it off).
        hflip: flip training images left-right with probability 0.5 (on the accelerator).
        pixel_mean: per-channel mean of the images scaled to [0, 1], for normalisation; by default the data module's
            (its `normalization` preset), else ImageNet's. Saved in the checkpoint, for offline analysis.
        pixel_std: per-channel standard deviation, likewise.
        init_from: a checkpoint to start from (fine-tuning): a vitx `.ckpt` or a state dict in the common ViT
            layout. The position embedding is resampled to `vit.image_size` and a head of another label set is
            replaced by a zero-initialised one.
        reset_head: with `init_from`, start from a zero-initialised head even when the label set is the same.
    """

    def __init__(
        self,
        vit: ViTConfig,
        optim: OptimConfig = OptimConfig(),
        label_smoothing: float = 0.1,
        hflip: bool = True,
        pixel_mean: Optional[tuple[float, float, float]] = None,
        pixel_std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
        reset_head: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if vit.num_classes < 2:
            raise ValueError(f"vit.num_classes must be >= 2 for classification, got {vit.num_classes}")
        # plain types only, so checkpoints load with torch.load(weights_only=True); `_class_path` lets
        # `vitx validate --ckpt_path` rebuild the model from the checkpoint's own hyperparameters
        self.save_hyperparameters(
            {
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "vit": asdict(vit),
                "optim": asdict(optim),
                "label_smoothing": label_smoothing,
                "hflip": hflip,
                "pixel_mean": list(pixel_mean) if pixel_mean else None,
                "pixel_std": list(pixel_std) if pixel_std else None,
                "init_from": init_from,
                "reset_head": reset_head,
            }
        )
        self.optim_cfg = optim
        self.label_smoothing = label_smoothing
        self.hflip = hflip
        self.mean = tuple(pixel_mean) if pixel_mean else None
        self.std = tuple(pixel_std) if pixel_std else None
        self.model = VisionTransformer(vit)
        self.init_notes: list[str] = []
        if init_from:
            self.init_notes = load_pretrained(self.model, init_from, reset_head)

        n = vit.num_classes
        # validation under data parallelism pads the last batches with IGNORE_INDEX labels: metrics skip them
        self.train_acc1 = MulticlassAccuracy(n, top_k=1, average="micro")
        self.val_loss = MeanMetric()
        self.val_acc1 = MulticlassAccuracy(n, top_k=1, average="micro", ignore_index=IGNORE_INDEX)
        self.val_acc5 = MulticlassAccuracy(n, top_k=min(5, n), average="micro", ignore_index=IGNORE_INDEX)

    # -- the hooks that the analysis callbacks and other tasks rely on --------------------------------------
    def analysis_backbone(self) -> VisionTransformer:
        return self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, num_classes)

    # -- data on the accelerator ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.model.cfg.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but the model head has {self.model.cfg.num_classes}: "
                f"set --model.vit.num_classes {data_classes}"
            )
        data_size = getattr(dm, "image_size", None)
        if data_size is not None and data_size != self.model.cfg.image_size:
            raise ValueError(
                f"the data is cropped to {data_size} px but the model expects {self.model.cfg.image_size} px: "
                "set --data.image_size and --model.vit.image_size to the same value"
            )
        if self.mean is None or self.std is None:
            self.mean = tuple(getattr(dm, "mean", None) or IMAGENET_MEAN)
            self.std = tuple(getattr(dm, "std", None) or IMAGENET_STD)
            self.hparams["pixel_mean"], self.hparams["pixel_std"] = list(self.mean), list(self.std)
        for note in self.init_notes:
            self.print(f"init_from: {note}")

    def on_fit_start(self) -> None:
        if self.trainer.log_dir:
            self.print(f"run directory: {self.trainer.log_dir} (TensorBoard: make tensorboard)")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch[0], batch[1]
        if self.trainer is not None and self.trainer.training and self.hflip:
            images = random_hflip(images)
        images = normalize(images, self.mean, self.std)  # uint8 -> float32, on the accelerator
        return (images, labels, *batch[2:])

    # -- steps ------------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        logits = self.model(images)  # (B, num_classes)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        self.train_acc1(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", self.train_acc1, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, labels = batch[0], batch[1]
        logits = self.model(images)
        real = labels != IGNORE_INDEX
        self.val_loss(F.cross_entropy(logits[real], labels[real], reduction="none"))
        self.val_acc1(logits, labels)
        self.val_acc5(logits, labels)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        self.log(f"{stage}/acc1", self.val_acc1, prog_bar=True)
        self.log(f"{stage}/acc5", self.val_acc5)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.model(batch[0]).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self.model, self.optim_cfg, total, skip=self.model.no_weight_decay())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
