"""Distillation losses against hand computations on fixed logits (plain Python math, no torch functionals); the
contrastive loss's local and whole-matrix forms against each other on W emulated processes."""

from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from vit_experiments.losses import (
    contrastive_loss,
    contrastive_loss_gathered,
    distillation_kl,
    distillation_loss,
    hard_distillation_loss,
    soft_distillation_loss,
    soft_target_cross_entropy,
)

CLS = [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]]
DIST = [[1.0, 1.5, 0.0], [-0.5, 2.0, 0.5]]
TEACHER = [[0.2, 3.0, -1.0], [1.0, 0.0, 4.0]]  # argmax: class 1, then class 2
LABELS = [0, 2]


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def ce(row, label):
    return -math.log(softmax(row)[label])


def ce_soft(row, target):
    return -sum(t * math.log(p) for t, p in zip(target, softmax(row)))


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


LOGITS = dict(cls_logits=t(CLS), dist_logits=t(DIST), teacher_logits=t(TEACHER))


def test_hard_distillation_by_hand():
    expected = sum(0.5 * ce(CLS[i], LABELS[i]) + 0.5 * ce(DIST[i], [1, 2][i]) for i in range(2)) / 2
    got = hard_distillation_loss(targets=torch.tensor(LABELS), **LOGITS)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha, tau", [(0.5, 1.0), (0.1, 3.0)])
def test_soft_distillation_by_hand(alpha, tau):
    expected = 0.0
    for i in range(2):
        kd = kl(softmax(TEACHER[i], tau), softmax(DIST[i], tau))  # KL(teacher || student) per sample
        expected += (1 - alpha) * ce(CLS[i], LABELS[i]) + alpha * tau**2 * kd
    expected /= 2
    got = soft_distillation_loss(targets=torch.tensor(LABELS), alpha=alpha, tau=tau, **LOGITS)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_no_distillation_trains_both_heads_on_the_labels():
    expected = sum(0.5 * ce(CLS[i], LABELS[i]) + 0.5 * ce(DIST[i], LABELS[i]) for i in range(2)) / 2
    got = distillation_loss("none", t(CLS), t(DIST), torch.tensor(LABELS))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_targets_from_mixup_and_label_smoothing():
    mixed = [[0.7, 0.0, 0.3], [0.1, 0.1, 0.8]]
    expected = sum(0.5 * ce_soft(CLS[i], mixed[i]) + 0.5 * ce(DIST[i], [1, 2][i]) for i in range(2)) / 2
    got = distillation_loss("hard", targets=t(mixed), **LOGITS)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # smoothing eps on integer labels: target 1 - eps + eps/K on the label, eps/K elsewhere
    eps = 0.1
    smooth = [[1 - eps + eps / 3 if k == LABELS[i] else eps / 3 for k in range(3)] for i in range(2)]
    expected = sum(ce_soft(CLS[i], smooth[i]) for i in range(2)) / 2
    assert soft_target_cross_entropy(t(CLS), torch.tensor(LABELS), eps).item() == pytest.approx(expected, rel=1e-6)


def test_padding_labels_are_ignored():
    got = soft_target_cross_entropy(t(CLS), torch.tensor([0, -100]))
    assert got.item() == pytest.approx(ce(CLS[0], 0), rel=1e-6)


def test_kl_is_zero_for_equal_logits_and_scales_with_tau_squared():
    x = t(DIST)
    assert distillation_kl(x, x, tau=2.0).item() == pytest.approx(0.0, abs=1e-12)
    expected = 4.0 * sum(kl(softmax(TEACHER[i], 2.0), softmax(DIST[i], 2.0)) for i in range(2)) / 2
    assert distillation_kl(t(DIST), t(TEACHER), tau=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_gradients_flow_to_the_student_only():
    cls, dist = t(CLS).requires_grad_(), t(DIST).requires_grad_()
    teacher = t(TEACHER).requires_grad_()
    for kind in ("hard", "soft"):
        loss = distillation_loss(kind, cls, dist, torch.tensor(LABELS), teacher.detach(), alpha=0.5, tau=2.0)
        loss.backward()
    assert cls.grad is not None and dist.grad is not None and teacher.grad is None


def test_bad_kind_and_missing_teacher_are_clear_errors():
    with pytest.raises(ValueError, match="none, soft, hard"):
        distillation_loss("medium", t(CLS), t(DIST), torch.tensor(LABELS))
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss("hard", t(CLS), t(DIST), torch.tensor(LABELS))


def test_deit_released_kl_reduction_is_the_paper_kl_over_k():
    """facebookresearch/deit #61: the released code divides the summed KL by B * K (torch's reduction "mean"),
    the paper's formula by B only ("batchmean"): exactly a factor K = 3 here."""
    paper = distillation_kl(t(DIST), t(TEACHER), tau=2.0)
    released = distillation_kl(t(DIST), t(TEACHER), tau=2.0, kl_reduction="mean")
    assert paper.item() == pytest.approx(3 * released.item(), rel=1e-6)  # computed in fp32
    expected = 4.0 * sum(kl(softmax(TEACHER[i], 2.0), softmax(DIST[i], 2.0)) for i in range(2)) / (2 * 3)
    assert released.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_translates_between_kl_reductions_as_documented():
    """"mean" with alpha == (1 - alpha + alpha / K) * "batchmean" with alpha' = alpha / (alpha + K (1 - alpha))."""
    K, alpha, tau = 3, 0.5, 3.0
    labels = torch.tensor(LABELS)
    released = distillation_loss("soft", targets=labels, alpha=alpha, tau=tau, kl_reduction="mean", **LOGITS)
    alpha_paper = alpha / (alpha + K * (1 - alpha))
    paper = distillation_loss("soft", targets=labels, alpha=alpha_paper, tau=tau, **LOGITS)
    assert released.item() == pytest.approx((1 - alpha + alpha / K) * paper.item(), rel=1e-6)
    default = distillation_loss("soft", targets=labels, alpha=alpha, tau=tau, **LOGITS)
    explicit = distillation_loss("soft", targets=labels, alpha=alpha, tau=tau, kl_reduction="batchmean", **LOGITS)
    assert default.item() == explicit.item()  # the paper's formula stays the default


def test_unknown_kl_reduction_is_a_clear_error():
    with pytest.raises(ValueError, match="batchmean, mean"):
        distillation_kl(t(DIST), t(TEACHER), tau=1.0, kl_reduction="sum")


# -- contrastive: local (B, N) rows vs the whole (N, N) matrix, on W emulated processes ----------------------------
def _emulated(local: bool, W: int = 4, B: int = 3, E: int = 5):
    """Each of W 'processes' scores its rows of a global batch of N = W * B pairs; -> (mean of their losses, the
    gradient of that mean with respect to the global features and the temperature)."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(W * B, E, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(W * B, E, generator=g), dim=-1).requires_grad_()
    t = torch.tensor(2.0, requires_grad=True)
    losses = [contrastive_loss_gathered(img[r * B:(r + 1) * B], txt[r * B:(r + 1) * B], img, txt, t, r, local)
              for r in range(W)]
    mean = torch.stack(losses).mean()
    return losses, mean, torch.autograd.grad(mean, (img, txt, t))


def test_local_and_whole_matrix_contrastive_losses_agree():
    local_losses, local_mean, local_grads = _emulated(local=True)
    full_losses, full_mean, full_grads = _emulated(local=False)
    W, B = 4, 3
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(W * B, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(W * B, 5, generator=g), dim=-1)
    whole = contrastive_loss(img, txt, torch.tensor(2.0), gather=False)  # one process, the whole batch
    torch.testing.assert_close(local_mean, whole)
    torch.testing.assert_close(full_mean, whole)
    for loss in full_losses:  # every process computes the whole loss
        torch.testing.assert_close(loss, whole)
    assert len({round(x.item(), 6) for x in local_losses}) == W  # each its own share
    for a, b in zip(local_grads, full_grads):
        torch.testing.assert_close(a, b)
    # one process: both forms are the plain loss
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(2.0), local=False), whole)
