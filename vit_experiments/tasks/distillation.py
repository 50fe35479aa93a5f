"""DeiT: a data-efficient ViT distilled from a frozen teacher through a distillation token.

Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention"
(https://arxiv.org/abs/2012.12877). The student is the project's one VisionTransformer with
`num_distill_tokens=1`: a second prefix token whose output feeds a second head, trained towards the teacher
(hard: its argmax; soft: its softened distribution) while the class head learns the labels. At inference the
two heads' logits are averaged. The recipe (Table 9) runs batch-wise on the accelerator: RandAugment, Mixup or
CutMix, random erasing, repeated augmentation, label smoothing, stochastic depth, AdamW with warm-up and cosine,
and an exponential moving average of the weights evaluated beside the raw ones.

The teacher is any vitx classifier checkpoint (a ViT, a ResNet trained with `CNNClassifier`, or another
DeiT), rebuilt from the checkpoint's own hyperparameters, frozen, in eval mode for good, and fed the student's
(augmented, mixed) images converted to its own normalisation and resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from data_pipelines.augment import MixupCutmix, RandAugment, random_erasing, repeat_batch
from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_hflip
from vit_experiments.losses import DISTILLATION_KINDS, IGNORE_INDEX, distillation_loss
from vit_experiments.models.pretrained import load_pretrained, saved_normalization
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer
from vit_experiments.tasks.ema import build_ema
from vit_experiments.tasks.layer_decay import layer_decay_param_groups
from vit_experiments.tasks.optim import OptimConfig, build_optimizer, warmup_cosine

# -- the teacher -------------------------------------------------------------------------------------------------


class FrozenTeacher(nn.Module):
    """A trained classifier used as a fixed function: eval mode whatever its parent does, no parameter trains,
    inputs converted from the student's normalisation and resolution to its own.

    Args:
        model: the classifier; maps (B, 3, S, S) images normalised with (mean, std) to (B, K) logits.
        image_size: S, the resolution it was trained at.
        mean, std: its normalisation.
        in_mean, in_std: the normalisation of the images it will be given (the student's); or later, with
            `set_input_normalization`.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_mean: Optional[Sequence[float]] = None,
        in_std: Optional[Sequence[float]] = None,
    ):
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


def load_teacher(
    path: str | Path, in_mean: Optional[Sequence[float]] = None, in_std: Optional[Sequence[float]] = None
) -> FrozenTeacher:
    """Rebuild a vitx classifier from its checkpoint (a Lightning `.ckpt`): the architecture from the
    `hyper_parameters` (`vit` for ViT and DeiT, `resnet` for ResNet; its normalisation by
    `saved_normalization`, ImageNet's when absent), the weights from `state_dict` under `model.`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher checkpoint not found: {path}. Train one first, e.g. `make teacher` "
            "(vitx fit --config conf/cnn/teacher-shapes.yaml), and point teacher_ckpt at its last.ckpt."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt.get("state_dict") or {}
    if "resnet" not in hp and "vit" not in hp:
        raise ValueError(
            f"{path} is not a vitx classifier checkpoint: its hyper_parameters have neither 'vit' nor 'resnet' "
            "(teachers are checkpoints written by `vitx fit` with ImageClassifier, CNNClassifier or "
            "DistillationClassifier)"
        )
    # the weights come from the checkpoint: initialise without drawing from the global generator, so a run
    # with a teacher and one without make the same random draws (student init, augmentation) from one seed
    with torch.random.fork_rng(devices=[]):
        if "resnet" in hp:
            model: nn.Module = ResNet(ResNetConfig(**hp["resnet"]))
        else:
            model = VisionTransformer(ViTConfig(**hp["vit"]))
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    mean, std = saved_normalization(hp)
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    return FrozenTeacher(model, model.cfg.image_size, mean, std, in_mean, in_std)


# -- the recipe --------------------------------------------------------------------------------------------------


@dataclass
class DeiTAugment:
    """Batch augmentations of the DeiT recipe (Table 9); the defaults are the paper's. 0 turns a step off."""

    hflip: bool = True
    # RandAugment rand-m9-mstd0.5: operations per image, magnitude (0..10) and its per-draw noise
    rand_augment_ops: int = 2
    rand_augment_magnitude: float = 9.0
    rand_augment_std: float = 0.5
    # Mixup / CutMix: Beta parameters (0 = off), chance a batch is mixed, chance of CutMix when both are on
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    # random erasing probability per image (pixel noise)
    erase_prob: float = 0.25
    # repeated augmentation: copies of each sample in a batch (1 = off)
    repeats: int = 3

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"augment.repeats must be >= 1 (1 = off), got {self.repeats}")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"augment.erase_prob must be in [0, 1], got {self.erase_prob}")


# -- the task ----------------------------------------------------------------------------------------------------


class DistillationClassifier(L.LightningModule):
    """A DeiT student trained with a class head on the labels and a distillation head on a frozen teacher.

    Args:
        vit: the student: any ViT size with `num_distill_tokens: 1` (DeiT-Ti is "Ti/16"; `drop_path_rate` 0.1).
        optim: AdamW and the warm-up + cosine schedule (DeiT: lr 5e-4 x batch / 512, weight decay 0.05, 5 warm-up
            epochs).
        distillation: "hard" (DeiT's best), "soft" or "none" (no teacher: both heads learn the labels).
        teacher_ckpt: a vitx classifier checkpoint (ResNet, ViT or DeiT); needed unless distillation is "none".
        alpha: soft distillation's weight of the KL term (DeiT's soft runs: 0.1).
        tau: soft distillation's temperature (DeiT's soft runs: 3.0).
        label_smoothing: smoothing of the label targets (0.1).
        augment: the batch augmentations (RandAugment, Mixup/CutMix, erasing, repeats, flip).
        ema_decay: decay per optimiser step of the weights' moving average, evaluated as val/ema_acc1
            (0.99996 in DeiT; 0 = no average).
        ema_warmup: ramp the decay as min(decay, (1 + n) / (10 + n)) so short runs get a useful average.
        layer_decay: layer-wise learning-rate decay for fine-tuning (1.0 = off, as in DeiT; 0.65-0.75 in BEiT).
        mean, std: normalisation of the student's input; by default the data module's (its `normalization`
            preset), else ImageNet's.
        init_from: a DeiT checkpoint to fine-tune from (position embedding resampled to `vit.image_size`).
        reset_head: with `init_from`, restart both heads from zero.
    """

    def __init__(
        self,
        vit: ViTConfig,
        optim: OptimConfig = OptimConfig(lr=5e-4, weight_decay=0.05),
        distillation: str = "hard",
        teacher_ckpt: Optional[str] = None,
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.1,
        augment: DeiTAugment = DeiTAugment(),
        ema_decay: float = 0.99996,
        ema_warmup: bool = False,
        layer_decay: float = 1.0,
        mean: Optional[tuple[float, float, float]] = None,
        std: Optional[tuple[float, float, float]] = None,
        init_from: Optional[str] = None,
        reset_head: bool = False,
    ) -> None:
        super().__init__()
        if distillation not in DISTILLATION_KINDS:
            raise ValueError(f"distillation must be one of {', '.join(DISTILLATION_KINDS)}, got {distillation!r}")
        if vit.num_distill_tokens != 1:
            raise ValueError("the DeiT student needs a distillation token: set vit.num_distill_tokens: 1")
        if vit.num_classes < 2:
            raise ValueError(f"vit.num_classes must be >= 2 for classification, got {vit.num_classes}")
        if distillation != "none" and not teacher_ckpt:
            raise ValueError(f"distillation {distillation!r} needs teacher_ckpt; set it, or distillation: none")
        if not 0.0 <= alpha <= 1.0 or tau <= 0:
            raise ValueError(f"need alpha in [0, 1] and tau > 0, got alpha={alpha}, tau={tau}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no moving average), got {ema_decay}")
        # plain types only, so checkpoints load with torch.load(weights_only=True); `_class_path` lets
        # `vitx validate --ckpt_path` rebuild the task from the checkpoint's own hyperparameters
        self.save_hyperparameters(
            {
                "_class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "vit": asdict(vit),
                "optim": asdict(optim),
                "distillation": distillation,
                "teacher_ckpt": teacher_ckpt,
                "alpha": alpha,
                "tau": tau,
                "label_smoothing": label_smoothing,
                "augment": asdict(augment),
                "ema_decay": ema_decay,
                "ema_warmup": ema_warmup,
                "layer_decay": layer_decay,
                "mean": list(mean) if mean else None,
                "std": list(std) if std else None,
                "init_from": init_from,
                "reset_head": reset_head,
            }
        )
        self.optim_cfg, self.distillation, self.alpha, self.tau = optim, distillation, alpha, tau
        self.label_smoothing, self.layer_decay = label_smoothing, layer_decay
        self.mean = tuple(mean) if mean else None  # resolved from the data module in setup() when None
        self.std = tuple(std) if std else None
        self.augment = augment

        self.model = VisionTransformer(vit)
        self.init_notes: list[str] = load_pretrained(self.model, init_from, reset_head) if init_from else []
        self.teacher: Optional[FrozenTeacher] = None
        if distillation != "none":
            self.teacher = load_teacher(teacher_ckpt, self.mean, self.std)
            k = self.teacher.model.cfg.num_classes
            if k != vit.num_classes:
                raise ValueError(f"the teacher predicts {k} classes but the student {vit.num_classes}; use a "
                                 "teacher trained on the same label set")
        self.ema = build_ema(self.model, ema_decay, ema_warmup) if ema_decay > 0 else None

        n = vit.num_classes
        self.rand_augment = RandAugment(
            augment.rand_augment_ops, augment.rand_augment_magnitude, augment.rand_augment_std,
            fill=[255 * m for m in (self.mean or IMAGENET_MEAN)],
        )
        self.mixup = MixupCutmix(n, augment.mixup_alpha, augment.cutmix_alpha, augment.mix_prob,
                                 augment.switch_prob, label_smoothing)

        def acc(top_k: int = 1) -> MulticlassAccuracy:
            return MulticlassAccuracy(n, top_k=min(top_k, n), average="micro", ignore_index=IGNORE_INDEX)

        # fused = the average of the two heads (DeiT's prediction); agreement = fused argmax == teacher argmax
        self.train_metrics = nn.ModuleDict({k: acc() for k in ("acc1", "acc1_cls", "acc1_dist", "agreement")})
        self.val_metrics = nn.ModuleDict({k: acc() for k in ("acc1", "acc1_cls", "acc1_dist", "agreement",
                                                             "teacher_acc1", "ema_acc1")})
        self.val_metrics["acc5"] = acc(5)
        self.val_loss = MeanMetric()

    # -- the hooks that the analysis callbacks and other tasks rely on ------------------------------------------
    def analysis_backbone(self) -> VisionTransformer:
        return self.model  # 2 prefix tokens: the analyses skip the class and distillation tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)  # (B, num_classes): the average of the class and distillation heads

    # -- checkpoints: the teacher lives in its own file -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = dict(state_dict)
        if self.teacher is not None:  # checkpoints carry no teacher weights: keep the ones loaded from teacher_ckpt
            for k, v in self.teacher.state_dict(prefix="teacher.").items():
                state_dict.setdefault(k, v)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- data on the accelerator ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.model.cfg.num_classes:
            raise ValueError(f"the data has {data_classes} classes but the student head has "
                             f"{self.model.cfg.num_classes}: set --model.vit.num_classes {data_classes}")
        data_size = getattr(dm, "image_size", None) or (getattr(dm, "hparams", None) or {}).get("image_size")
        if data_size is not None and data_size != self.model.cfg.image_size:
            raise ValueError(f"the data is cropped to {data_size} px but the student expects "
                             f"{self.model.cfg.image_size} px: set --data.image_size and --model.vit.image_size alike")
        if self.mean is None or self.std is None:
            self.mean = tuple(getattr(dm, "mean", None) or IMAGENET_MEAN)
            self.std = tuple(getattr(dm, "std", None) or IMAGENET_STD)
            self.hparams["mean"], self.hparams["std"] = list(self.mean), list(self.std)
            self.rand_augment.fill = tuple(255 * m for m in self.mean)
        if self.teacher is not None:
            self.teacher.set_input_normalization(self.mean, self.std)
        for note in self.init_notes:
            self.print(f"init_from: {note}")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Training: repeat -> flip -> RandAugment -> normalise -> erase -> Mixup/CutMix, returning
        (images, labels, targets) with targets (B, K) when mixing, else the labels. Evaluation: normalise."""
        images, labels = batch[0], batch[1]
        if not self.trainer.training:
            return (normalize(images, self.mean, self.std), labels, labels)
        aug = self.augment
        images, labels = repeat_batch(images, labels, aug.repeats)
        if aug.hflip:
            images = random_hflip(images)
        if aug.rand_augment_ops > 0:
            images = self.rand_augment(images)  # float in [0, 255]
        images = normalize(images, self.mean, self.std)  # (B, 3, H, W) float32
        images = random_erasing(images, aug.erase_prob)
        targets = labels
        if self.mixup.enabled:
            images, targets, _ = self.mixup(images, labels)  # targets (B, K), smoothing folded in
        return (images, labels, targets)

    # -- steps --------------------------------------------------------------------------------------------------
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
                                 self.alpha, self.tau, smoothing)
        # the label of a mixed image is its larger share
        seen = targets.argmax(-1) if targets.ndim == 2 else labels
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

    def _evaluate(self, batch, stage: str) -> None:
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

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.model(batch[0]).softmax(-1)
        return {"probs": probs, "pred": probs.argmax(-1)}

    # -- optimisation -------------------------------------------------------------------------------------------
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # once per optimiser step, after it (also with gradient accumulation)
            self.ema.update_parameters(self.model)

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        skip = self.model.no_weight_decay()
        if self.layer_decay == 1.0:
            opt, sched = build_optimizer(self.model, self.optim_cfg, total, skip=skip)
        else:
            cfg = self.optim_cfg
            groups = layer_decay_param_groups(self.model, cfg.lr, cfg.weight_decay, self.layer_decay, skip)
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
            warmup = min(cfg.warmup_steps, max(total - 1, 0))
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: warmup_cosine(step, warmup, total, cfg.min_lr_ratio)
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
