"""DeiT: a data-efficient ViT distilled from a frozen teacher through a distillation token.

Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention"
(https://arxiv.org/abs/2012.12877). The student is the project's one VisionTransformer with
`num_distill_tokens=1`: a second prefix token whose output feeds a second head, trained towards the teacher
(hard: its argmax; soft: its softened distribution) while the class head learns the labels. At inference the
two heads' logits are averaged. The recipe (Table 9) runs batch-wise on the accelerator: RandAugment, Mixup or
CutMix, random erasing, repeated augmentation, label smoothing, stochastic depth, AdamW with warm-up and cosine,
and an exponential moving average of the weights evaluated beside the raw ones.

The teacher (vit_experiments.tasks.teacher) is any classifier checkpoint vitx reads: a ResNet or ViT trained with
`ImageClassifier`, or another DeiT. Its weights are not stored in the student's checkpoints: resuming a fit
(`--ckpt_path`) reads `teacher_ckpt` again (`--model.teacher_ckpt` on the command line names a moved file), while
evaluating a checkpoint whose teacher file is gone goes on without the teacher's metrics, with a warning.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn
from torchmetrics import MeanMetric

from data_pipelines.augment import MixupCutmix, RandAugment, random_erasing, repeat_batch
from data_pipelines.constants import IGNORE_INDEX
from data_pipelines.transforms import normalize, random_hflip
from vit_experiments.losses import DISTILLATION_KINDS, KL_REDUCTIONS, distillation_loss
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.tasks.classification import accuracy
from vit_experiments.tasks.core import VisionTask, as_config, restoring_stage
from vit_experiments.tasks.ema import build_ema
from vit_experiments.tasks.optim import OptimConfig
from vit_experiments.tasks.teacher import FrozenTeacher, load_teacher, teacher_exists


@dataclass
class DeiTAugment:
    """Batch augmentations of the DeiT recipe (Table 9); the defaults are the paper's. 0 turns a step off."""

    hflip: bool = True
    rand_augment_ops: int = 2
    """RandAugment rand-m9-mstd0.5: operations per image, magnitude (0..10) and its per-draw noise"""
    rand_augment_magnitude: float = 9.0
    rand_augment_std: float = 0.5
    mixup_alpha: float = 0.8
    """Mixup / CutMix: Beta parameters (0 = off), chance a batch is mixed, chance of CutMix when both are on"""
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    erase_prob: float = 0.25
    """random erasing probability per image (pixel noise)"""
    repeats: int = 3
    """repeated augmentation: copies of each sample in a batch (1 = off)"""

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"augment.repeats must be >= 1 (1 = off), got {self.repeats}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"augment.erase_prob must be in [0, 1], got {self.erase_prob}")


class DistillationClassifier(VisionTask):
    """A DeiT student trained with a class head on the labels and a distillation head on a frozen teacher.

    Args:
        vit: the student: any ViT size with `num_distill_tokens: 1` (DeiT-Ti is "Ti/16"; `drop_path_rate` 0.1).
        optim: AdamW and the warm-up + cosine schedule (DeiT: lr 5e-4 x batch / 512, weight decay 0.05, 5 warm-up
            epochs); `optim.layer_decay` for fine-tuning.
        distillation: "hard" (DeiT's best), "soft" or "none" (no teacher: both heads learn the labels).
        teacher_ckpt: a classifier checkpoint (ResNet, ViT or DeiT); needed unless distillation is "none" (evaluating
            a student checkpoint does without it, and without the teacher's metrics, when the file is gone).
        alpha: soft distillation's weight of the KL term. Hard distillation weighs its two terms 0.5 each and
            ignores alpha.
        tau: soft distillation's temperature.
        kl_reduction: "batchmean" sums the KL over classes (the paper's formula); "mean" also divides by the number
            of classes, as DeiT's released code does, whose soft runs use alpha 0.1, tau 3.0 with it (see
            vit_experiments.losses for how alpha translates between the two).
        label_smoothing: smoothing of the label targets (0.1).
        augment: the batch augmentations (RandAugment, Mixup/CutMix, erasing, repeats, flip).
        ema_decay: decay per optimiser step of the weights' moving average, evaluated as val/ema_acc1
            (0.99996 in DeiT; 0 = no average).
        ema_warmup: ramp the decay as min(decay, (1 + n) / (10 + n)) so short runs get a useful average.
        mean, std: normalisation of the student's input; by default a checkpoint's, else the data module's
            preset, else ImageNet's.
        init_from: a checkpoint to fine-tune from (position embedding resampled to `vit.image_size`); not read when
            the student is restored from a checkpoint of its own.
        reset_head: with `init_from`, restart both heads from zero.
    """

    # the training step calls forward_features then the two heads (not forward): whole-model compile starts there
    compiled_entry_points = ("forward_features",)

    def __init__(
        self,
        vit: ViTConfig,
        optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=0.05),
        distillation: str = "hard",
        teacher_ckpt: Optional[str] = None,
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: str = "batchmean",
        label_smoothing: float = 0.1,
        augment: DeiTAugment = DeiTAugment(),
        ema_decay: float = 0.99996,
        ema_warmup: bool = False,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
        reset_head: bool = False,
    ) -> None:
        super().__init__(optim, mean, std)
        vit, augment = as_config(ViTConfig, vit), as_config(DeiTAugment, augment)
        if distillation not in DISTILLATION_KINDS:
            raise ValueError(f"distillation must be one of {', '.join(DISTILLATION_KINDS)}, got {distillation!r}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ValueError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {kl_reduction!r}")
        if vit.num_distill_tokens != 1:
            raise ValueError("the DeiT student needs a distillation token: set vit.num_distill_tokens: 1")
        if vit.num_classes < 2:
            raise ValueError(f"vit.num_classes must be >= 2 for classification, got {vit.num_classes}")
        if distillation != "none" and not teacher_ckpt and restoring_stage() in (None, "fit"):
            raise ValueError(f"distillation {distillation!r} needs teacher_ckpt; set it, or distillation: none")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise ValueError(f"need alpha in [0, 1] and tau > 0, got alpha={alpha}, tau={tau}")
        if distillation == "hard" and alpha != 0.5:
            warnings.warn(f"hard distillation weighs its two terms 0.5 each: alpha={alpha} is ignored "
                          "(alpha and tau apply to distillation: soft)", UserWarning, stacklevel=2)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no moving average), got {ema_decay}")
        self.save_task_hyperparameters(
            vit=vit, optim=self.optim_cfg, distillation=distillation, teacher_ckpt=teacher_ckpt, alpha=alpha, tau=tau,
            kl_reduction=kl_reduction, label_smoothing=label_smoothing, augment=augment, ema_decay=ema_decay,
            ema_warmup=ema_warmup, mean=mean, std=std, init_from=init_from, reset_head=reset_head)
        self.distillation, self.alpha, self.tau, self.kl_reduction = distillation, alpha, tau, kl_reduction
        self.label_smoothing, self.augment = label_smoothing, augment

        self.model = VisionTransformer(vit)
        self.init_weights_from(init_from, reset_head)
        self.teacher: Optional[FrozenTeacher] = self._teacher(distillation, teacher_ckpt)
        if self.teacher is not None:
            if self.teacher.num_classes != vit.num_classes:
                raise ValueError(f"the teacher predicts {self.teacher.num_classes} classes but the student "
                                 f"{vit.num_classes}; use a teacher trained on the same label set")
        self.ema = build_ema(self.model, ema_decay, ema_warmup) if ema_decay > 0 else None

        n = vit.num_classes
        self.rand_augment = RandAugment(augment.rand_augment_ops, augment.rand_augment_magnitude,
                                        augment.rand_augment_std, fill=[255 * m for m in self.normalization[0]])
        self.mixup = MixupCutmix(n, augment.mixup_alpha, augment.cutmix_alpha, augment.mix_prob,
                                 augment.switch_prob, label_smoothing)
        # fused = the average of the two heads (DeiT's prediction); agreement = fused argmax == teacher argmax
        self.train_metrics = nn.ModuleDict({k: accuracy(n) for k in ("acc1", "acc1_cls", "acc1_dist", "agreement")})
        self.val_metrics = nn.ModuleDict({k: accuracy(n) for k in ("acc1", "acc1_cls", "acc1_dist", "agreement",
                                                                   "teacher_acc1", "ema_acc1")})
        self.val_metrics["acc5"] = accuracy(n, 5)
        self.val_loss = MeanMetric()
        self.on_normalization(*self.normalization)  # the given or default one; setup() resolves it for a run

    @staticmethod
    def _teacher(distillation: str, teacher_ckpt: Optional[str]) -> Optional[FrozenTeacher]:
        """The frozen teacher, whose weights are in its own file, never in the student's checkpoints. Evaluating a
        checkpoint does without it when that file is gone (no teacher metrics); resuming a fit does not."""
        if distillation == "none":
            return None
        stage = restoring_stage()
        if stage is None or (teacher_ckpt and teacher_exists(teacher_ckpt)):
            return load_teacher(teacher_ckpt)
        if stage == "fit":
            raise FileNotFoundError(
                f"resuming this {distillation} distillation run needs its teacher, whose weights are not in the "
                f"student's checkpoint, and teacher_ckpt {teacher_ckpt} is not found: point --model.teacher_ckpt at "
                "the teacher's checkpoint (or resume with --model.distillation none to go on without a teacher)")
        if rank_zero_only.rank == 0:
            print(f"vitx: warning: teacher_ckpt {teacher_ckpt} not found: evaluating the student without its teacher "
                  "(no teacher_acc1, agreement); --model.teacher_ckpt PATH adds them", file=sys.stderr, flush=True)
        return None

    def analysis_backbone(self) -> VisionTransformer:
        return self.model  # 2 prefix tokens: the analyses skip the class and distillation tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, num_classes): the average of the class and distillation heads

    def on_normalization(self, mean, std) -> None:
        self.rand_augment.fill = tuple(255 * m for m in mean)
        if self.teacher is not None:
            self.teacher.set_input_normalization(mean, std)

    def sharded_modules(self) -> list[nn.Module]:
        return [self.model] + ([self.ema.module] if self.ema is not None else [])

    # -- checkpoints: the teacher lives in its own file -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        if self.teacher is not None:  # checkpoints carry no teacher weights: keep the ones loaded from teacher_ckpt
            for k, v in self.teacher.state_dict(prefix="teacher.").items():
                state_dict.setdefault(k, v)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- the batch on the accelerator -------------------------------------------------------------------------
    def prepare_batch(self, batch, training: bool):
        """Training: repeat -> flip -> RandAugment -> normalise -> erase -> Mixup/CutMix, returning
        (images, labels, targets) with targets (B, K) when mixing, else the labels. Evaluation: normalise."""
        images, labels = batch[0], batch[1]
        if not training:
            return (normalize(images, *self.normalization), labels, labels)
        aug = self.augment
        images, labels = repeat_batch(images, labels, aug.repeats)
        if aug.hflip:
            images = random_hflip(images)
        if aug.rand_augment_ops > 0:
            images = self.rand_augment(images)  # float in [0, 255]
        images = normalize(images, *self.normalization)  # (B, 3, H, W) float32
        images = random_erasing(images, aug.erase_prob)
        targets = labels
        if self.mixup.enabled:
            images, targets, _ = self.mixup(images, labels)  # targets (B, K), smoothing folded in
        return (images, labels, targets)

    # -- steps ------------------------------------------------------------------------------------------------
    def _heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_distill_heads(self.model.forward_features(images))  # 2 x (B, K)

    def _teacher_logits(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.teacher is None else self.teacher(images)  # (B, K), no graph

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, targets = batch
        cls_logits, dist_logits = self._heads(images)
        teacher_logits = self._teacher_logits(images)  # on the same (mixed) images as the student
        smoothing = self.label_smoothing if targets.ndim == 1 else 0.0  # soft targets carry it already
        loss = distillation_loss(self.distillation, cls_logits, dist_logits, targets, teacher_logits,
                                 self.alpha, self.tau, smoothing, kl_reduction=self.kl_reduction)
        seen = targets.argmax(-1) if targets.ndim == 2 else labels  # the label of a mixed image: its larger share
        self._update(self.train_metrics, cls_logits, dist_logits, seen, teacher_logits)
        self.log("train/loss", loss, prog_bar=True)
        self._log_metrics(self.train_metrics, "train")
        return loss

    def _update(self, metrics, cls_logits, dist_logits, labels, teacher_logits) -> None:
        fused = (cls_logits + dist_logits) / 2  # (B, K)
        metrics["acc1"](fused, labels)
        metrics["acc1_cls"](cls_logits, labels)
        metrics["acc1_dist"](dist_logits, labels)
        if "acc5" in metrics:
            metrics["acc5"](fused, labels)
        if teacher_logits is not None:
            decision = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, teacher_logits.argmax(-1))  # (B,)
            metrics["agreement"](fused, decision)
            if "teacher_acc1" in metrics:
                metrics["teacher_acc1"](teacher_logits, labels)

    def _log_metrics(self, metrics, stage: str) -> None:
        for name, metric in metrics.items():
            if metric.update_called:  # agreement, teacher and EMA metrics exist only when they apply
                self.log(f"{stage}/{name}", metric, prog_bar=name == "acc1")

    def evaluate(self, batch, stage: str) -> None:
        images, labels = batch[0], batch[1]
        cls_logits, dist_logits = self._heads(images)
        fused = (cls_logits + dist_logits) / 2
        self._update(self.val_metrics, cls_logits, dist_logits, labels, self._teacher_logits(images))
        if self.ema is not None:
            self.val_metrics["ema_acc1"](self.ema.module(images), labels)
        real = labels != IGNORE_INDEX  # padding of the last batches under data parallelism
        self.val_loss(F.cross_entropy(fused[real].float(), labels[real], reduction="none"))
        self.log(f"{stage}/loss", self.val_loss, prog_bar=True)
        self._log_metrics(self.val_metrics, stage)

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)
