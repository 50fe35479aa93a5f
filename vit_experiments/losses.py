"""Training losses shared by the tasks: DeiT's distillation losses and CLIP's contrastive loss.

Distillation (Touvron et al. 2021, "Training data-efficient image transformers & distillation through
attention", Sec. 4): a student with a class head and a distillation head learns from the labels on the first and
from a frozen teacher on the second.

    none:  0.5 * CE(cls, y) + 0.5 * CE(dist, y)                  both heads on the labels (no teacher)
    hard:  0.5 * CE(cls, y) + 0.5 * CE(dist, argmax teacher)    the teacher's decision as a second label
    soft:  (1 - a) * CE(cls, y) + a * tau^2 * KL(softmax(teacher / tau) || softmax(dist / tau))   (Hinton et al. 2015)

`y` is either integer labels (B,) or a distribution over classes (B, K) such as the mixed targets of Mixup and
CutMix (label smoothing already folded in). tau^2 keeps the KL term's gradient on the scale of the
cross-entropy's as tau grows (Hinton et al.).

How the KL divergence is reduced (`kl_reduction`):

    "batchmean"  summed over the K classes, averaged over the B samples: the divergence of the two distributions
                 per sample, the paper's formula (the default).
    "mean"       averaged over all B * K entries, i.e. "batchmean" / K: what DeiT's released code computes
                 (`F.kl_div(..., reduction='sum') * T * T / outputs_kd.numel()`, facebookresearch/deit #61), so
                 alpha and tau taken from its runs reproduce them only with "mean".

Translating between them at the same tau: the "mean" loss with alpha is c times the "batchmean" loss with
alpha' = alpha / (alpha + K * (1 - alpha)), where c = 1 - alpha + alpha / K (an overall scale, which Adam-type
optimisers all but ignore). E.g. DeiT's alpha = 0.5 over K = 1000 classes is alpha' = 0.5 / 500.5 ~ 0.001 here;
conversely "batchmean" with alpha' is "mean" with alpha = K * alpha' / (1 - alpha' + K * alpha').
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from data_pipelines.constants import IGNORE_INDEX  # a padding sample's label; re-exported for the tasks
from data_pipelines.distributed import rank_world

DISTILLATION_KINDS = ("none", "soft", "hard")
KL_REDUCTIONS = ("batchmean", "mean")  # the paper's per-sample KL; DeiT's released code's per-entry mean


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits (B, K) against integer labels (B,) (smoothed by `label_smoothing`, labels of
    IGNORE_INDEX skipped) or against target distributions (B, K) (used as they are: smoothing is the caller's)."""
    if targets.ndim == 2:
        if targets.shape != logits.shape:
            raise ValueError(f"soft targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, K) in fp32 under autocast too
        return -(targets.float() * log_probs).sum(-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float, kl_reduction: str = "batchmean"
) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)): summed over classes and averaged over the
    batch ("batchmean"), or averaged over batch and classes ("mean", DeiT's released code: 1/K of the former)."""
    if kl_reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown kl_reduction {kl_reduction!r}; choose one of {', '.join(KL_REDUCTIONS)}")
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)  # (B, K)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)  # (B, K)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction=kl_reduction, log_target=True)
    return kl * tau * tau


def hard_distillation_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """0.5 * CE(cls, y) + 0.5 * CE(dist, argmax teacher): DeiT's default, and its best on ImageNet."""
    teacher_labels = teacher_logits.argmax(dim=-1)  # (B,) the teacher's decision; no smoothing, as in DeiT
    return 0.5 * soft_target_cross_entropy(cls_logits, targets, label_smoothing) + 0.5 * F.cross_entropy(
        dist_logits.float(), teacher_labels
    )


def soft_distillation_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    tau: float,
    label_smoothing: float = 0.0,
    kl_reduction: str = "batchmean",
) -> torch.Tensor:
    """(1 - alpha) * CE(cls, y) + alpha * tau^2 * KL(softmax(teacher / tau) || softmax(dist / tau)), the KL
    reduced by `kl_reduction` (see the module docstring for how alpha translates between the two)."""
    ce = soft_target_cross_entropy(cls_logits, targets, label_smoothing)
    return (1.0 - alpha) * ce + alpha * distillation_kl(dist_logits, teacher_logits, tau, kl_reduction)


def no_distillation_loss(
    cls_logits: torch.Tensor, dist_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Both heads on the labels: the same student trained without a teacher, fused inference still defined."""
    return 0.5 * soft_target_cross_entropy(cls_logits, targets, label_smoothing) + 0.5 * soft_target_cross_entropy(
        dist_logits, targets, label_smoothing
    )


def distillation_loss(
    kind: str,
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    alpha: float = 0.5,
    tau: float = 1.0,
    label_smoothing: float = 0.0,
    kl_reduction: str = "batchmean",
) -> torch.Tensor:
    """The DeiT loss of `kind` ("none", "soft", "hard"); see the module docstring. `alpha`, `tau` and
    `kl_reduction` are used by "soft" only: "hard" weighs its two terms 0.5 each whatever alpha is."""
    if kind not in DISTILLATION_KINDS:
        raise ValueError(f"unknown distillation {kind!r}; choose one of {', '.join(DISTILLATION_KINDS)}")
    if kind == "none":
        return no_distillation_loss(cls_logits, dist_logits, targets, label_smoothing)
    if teacher_logits is None:
        raise ValueError(f"distillation {kind!r} needs the teacher's logits; use 'none' to train without a teacher")
    if kind == "hard":
        return hard_distillation_loss(cls_logits, dist_logits, targets, teacher_logits, label_smoothing)
    return soft_distillation_loss(
        cls_logits, dist_logits, targets, teacher_logits, alpha, tau, label_smoothing, kl_reduction
    )


# ----------------------------------------------------------------------------------------------------------
# Contrastive (CLIP): Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
# Supervision", Fig. 3: symmetric cross-entropy over the image-text similarity matrix of the (global) batch.


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each process the sum, over processes, of the gradient with respect
    to its rows: every process used them, so every process's loss trains them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_world()
        ctx.rank, ctx.world, ctx.rows = rank, world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W * B, E)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()  # (W * B, E)
        if torch.distributed.get_backend() == "gloo":  # gloo has no reduce-scatter
            torch.distributed.all_reduce(grad)
            return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]  # (B, E)
        out = grad.new_empty(ctx.rows, *grad.shape[1:])  # (B, E)
        torch.distributed.reduce_scatter_tensor(out, grad)
        return out


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """(B, E) on each of W processes -> (W * B, E), rank 0's rows first, on every process.

    Gradients flow through the gather: in backward each process receives the sum over processes of the
    gradient with respect to its rows, so rows scored on other devices still train this device's towers.
    Every process must pass the same B. With one process (or no process group) the features come back as
    they are.
    """
    _, world = rank_world()
    if world == 1:
        return features
    return _GatherWithGrad.apply(features)


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    local: bool = True,
) -> torch.Tensor:
    """CLIP's loss on this process's rows, scored against the whole (gathered) batch.

    image_features, text_features: (B, E) L2-normalised embeddings of B matching pairs on this process.
    logit_scale: () the *log* of the multiplier: logits = exp(logit_scale) * image @ text^T.
    gather: False scores the local rows among themselves only (e.g. validation rows, whose count may differ
        between processes).
    local: how much of the global N x N similarity matrix (N = W * B) each process builds.
        True (the default; open_clip's `local_loss=True`): only its own B rows, (B, N) image->text and (B, N)
        text->image logits, and it returns (mean cross-entropy over its image rows + mean over its caption
        rows) / 2, its share of the loss. The mean of this value over the W processes is the single-device
        loss on the whole batch.
        False (open_clip's default, `local_loss=False`): the whole (N, N) matrix on every process, every process
        returning the whole batch's loss. W times the logits' memory and compute, the same value (as a mean over
        processes) and the same gradients: kept for comparison and for parity with open_clip.

    Either way the gradients equal the single-device ones once data parallelism averages them (DDP and FSDP do):
    the gradient that reaches other processes' rows through the gather is summed back to them. Computed in fp32
    with autocast off, so bf16/fp16 training does not round logits scaled by up to 100.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            f"image and text features must both be (B, E), got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    rank = rank_world()[0] if gather else 0
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        image_features, text_features = image_features.float(), text_features.float()
        all_images = gather_features(image_features) if gather else image_features  # (N, E), N = W * B
        all_texts = gather_features(text_features) if gather else text_features  # (N, E)
        return contrastive_loss_gathered(image_features, text_features, all_images, all_texts, logit_scale, rank,
                                         local)


def contrastive_loss_gathered(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    all_images: torch.Tensor,
    all_texts: torch.Tensor,
    logit_scale: torch.Tensor,
    rank: int,
    local: bool = True,
) -> torch.Tensor:
    """contrastive_loss once the features are gathered: this process's (B, E) rows sit at rows
    [rank * B, (rank + 1) * B) of the (N, E) `all_images` / `all_texts`. In fp32 as given (no autocast here)."""
    B = image_features.shape[0]
    scale = logit_scale.float().exp()  # ()
    if local:
        rows_i, rows_t, first = image_features, text_features, rank * B  # my rows; their pairs' columns
    else:
        rows_i, rows_t, first = all_images, all_texts, 0  # every row of the global batch
    logits_per_image = scale * rows_i @ all_texts.T  # (B or N, N) images vs every caption
    # captions vs every image; the whole matrix's transpose when it is whole (one matmul, as open_clip)
    logits_per_text = scale * rows_t @ all_images.T if local else logits_per_image.T  # (B or N, N)
    labels = torch.arange(first, first + rows_i.shape[0], device=image_features.device)  # the matching columns
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
