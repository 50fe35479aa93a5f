"""The DeiT training augmentations, batch-wise on the accelerator, in pure torch.

DeiT (Touvron et al. 2021, Table 9) trains with RandAugment (Cubuk et al. 2020, magnitude 9 with noise 0.5, two
operations), Mixup (Zhang et al. 2018, alpha 0.8) and CutMix (Yun et al. 2019, alpha 1.0) chosen with equal odds
per batch, random erasing (Zhong et al. 2020, probability 0.25) and repeated augmentation (Hoffer et al. 2020,
3 copies). Here each runs on a whole batch already on the device, with per-sample random choices, so the CPU
workers only decode and crop:

    uint8 batch -> repeat_batch -> random_hflip -> RandAugment -> normalize -> random_erasing -> MixupCutmix

RandAugment works on [0, 255] pixel values (uint8 or float) and returns float, its geometric operations
following PIL's (and so timm's) conventions: shear pivots on the top-left corner, rotation on the centre, bicubic
resampling as in DeiT's recipe. Erasing fills with unit normal noise, so it follows normalisation; Mixup/CutMix
come last and return soft targets with label smoothing folded in.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _rand(n: int, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """n uniforms in [0, 1) on `device`, drawn from `generator` (on its own device) when given."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def _randn(shape: Sequence[int], device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(*shape, generator=generator, device=gen_device).to(device)


# ----------------------------------------------------------------------------------------------------------
# repeated augmentation


def repeat_batch(images: torch.Tensor, labels: torch.Tensor, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeated augmentation at the batch level: the first ceil(B / repeats) samples, each `repeats` times in a
    row, cut to B. The batch keeps its size and the copies are then augmented independently.

    DeiT's sampler gives each of 3 copies to a different GPU with its own crop; here the copies share the CPU's
    crop and differ by the accelerator-side augmentations. As in DeiT an epoch then sees 1/repeats of the corpus.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (1 = off), got {repeats}")
    if repeats == 1:
        return images, labels
    B = images.shape[0]
    idx = torch.arange(math.ceil(B / repeats), device=images.device).repeat_interleave(repeats)[:B]  # (B,)
    return images[idx], labels[idx]


# ----------------------------------------------------------------------------------------------------------
# RandAugment: pixel operations on a subset of the batch, x float in [0, 255], m (n,) magnitudes in [0, 10]


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)  # (n, 1, 1, 1) broadcasts over (n, C, H, W)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as PIL's convert("L"): (n, 3, H, W) -> (n, 1, H, W)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate), clipped."""
    return (degenerate + _per_sample(factor) * (x - degenerate)).clamp(0, 255)


def _enhance_factor(m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The "increasing" enhance ops: factor 1 +- 0.9 * m / 10 (further from 1 as m grows)."""
    return 1.0 + sign * 0.9 * m / 10


def auto_contrast(x, m, sign, fill):
    lo = x.amin(dim=(2, 3), keepdim=True)  # (n, C, 1, 1)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))  # flat channels stay as they are
    return ((x - lo) * scale).clamp(0, 255)


def equalize(x, m, sign, fill):
    """Histogram equalisation per channel, PIL's algorithm: lut[i] = (step // 2 + #pixels below i) // step."""
    n, C, H, W = x.shape
    v = x.round().clamp(0, 255).long().reshape(n * C, H * W)  # (nC, HW); reshape: x may be channels-last
    hist = torch.zeros(n * C, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float))
    last = torch.where(hist > 0, torch.arange(256, device=x.device), -1).amax(dim=1)  # (nC,) top occupied value
    step = torch.div(H * W - hist.gather(1, last[:, None]).squeeze(1), 255, rounding_mode="floor")  # (nC,)
    below = hist.cumsum(1) - hist  # (nC, 256) pixels strictly below each value
    safe = step.clamp_min(1)[:, None]
    lut = torch.div(torch.div(step, 2, rounding_mode="floor")[:, None] + below, safe, rounding_mode="floor")
    lut = lut.clamp(0, 255)
    out = lut.gather(1, v).float()  # (nC, HW)
    out = torch.where(step[:, None] > 0, out, v.float())  # a (nearly) flat channel is left alone
    return out.view(n, C, H, W)


def invert(x, m, sign, fill):
    return 255.0 - x


def posterize(x, m, sign, fill):
    """Keep 4 - int(0.4 m) high bits (fewer as m grows)."""
    bits = 4 - (m * 0.4).floor()  # (n,)
    q = _per_sample(torch.pow(2.0, 8 - bits))
    return (x.floor() / q).floor() * q


def solarize(x, m, sign, fill):
    """Invert pixels at or above 256 - 25.6 m (more of them as m grows)."""
    threshold = _per_sample(256.0 - (m * 25.6).floor())
    return torch.where(x >= threshold, 255.0 - x, x)


def solarize_add(x, m, sign, fill):
    add = _per_sample((m * 11.0).floor())
    return torch.where(x < 128, (x + add).clamp(0, 255), x)


def color(x, m, sign, fill):
    return _blend(x, _grayscale(x), _enhance_factor(m, sign))


def contrast(x, m, sign, fill):
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True).round()  # (n, 1, 1, 1), PIL's histogram mean
    return _blend(x, mean, _enhance_factor(m, sign))


def brightness(x, m, sign, fill):
    return _blend(x, torch.zeros_like(x), _enhance_factor(m, sign))


def sharpness(x, m, sign, fill):
    """Blend with PIL's SMOOTH filter (3x3, centre weight 5, total 13); the border pixels stay unfiltered."""
    C = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(C, 1, 3, 3)
    smooth = F.conv2d(x, k, padding=1, groups=C)  # (n, C, H, W)
    border = torch.ones_like(x[:1, :1], dtype=torch.bool)
    border[..., 1:-1, 1:-1] = False
    return _blend(x, torch.where(border, x, smooth), _enhance_factor(m, sign))


def _affine(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Resample x (n, C, H, W) at theta (n, 2, 3) (output -> input, normalised coordinates, align_corners=False),
    as PIL's Image.transform does and so as timm's RandAugment sees it: bicubic (DeiT's recipe interpolates
    bicubically), neighbours clamped at the edge, and a pixel whose source point falls outside the image takes
    `fill` (C,) outright. Bicubic overshoots, so the result is clipped back into [0, 255]."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (n, H, W, 2)
    img = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)  # (n, C, H, W)
    # PIL's test: source point (in pixel-edge units) in [0, W) x [0, H), i.e. [-1, 1) in normalised units
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1).unsqueeze(1)  # (n, 1, H, W)
    return torch.where(inside, img, fill.view(1, -1, 1, 1).to(img.dtype)).clamp(0, 255)


def _eye(n: int, x: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)  # (n, 2, 3)


# In normalised coordinates a pixel offset along x is worth 2 / W and along y 2 / H, so an operation written in
# pixels (as PIL's are) carries the aspect ratio H / W into theta's off-diagonal terms.


def rotate(x, m, sign, fill):
    """About the image centre (PIL's Image.rotate), up to 30 degrees."""
    H, W = x.shape[-2:]
    a = torch.deg2rad(sign * 3.0 * m)
    theta = _eye(len(x), x)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin() * H / W
    theta[:, 1, 0], theta[:, 1, 1] = a.sin() * W / H, a.cos()
    return _affine(x, theta, fill)


def shear_x(x, m, sign, fill):
    """PIL's AFFINE (1, s, 0, 0, 1, 0) as timm applies it: x_in = x + s * y in pixels, pivoting on the top-left
    corner (not the centre: rows further down shift further, up to s * H), s up to 0.3."""
    H, W = x.shape[-2:]
    s = sign * 0.03 * m  # (n,)
    theta = _eye(len(x), x)
    theta[:, 0, 1] = s * H / W
    theta[:, 0, 2] = s * H / W  # y = 0 (the top edge) is normalised -1: the shift that pins it in place
    return _affine(x, theta, fill)


def shear_y(x, m, sign, fill):
    """PIL's AFFINE (1, 0, 0, s, 1, 0): y_in = y + s * x in pixels, pivoting on the top-left corner."""
    H, W = x.shape[-2:]
    s = sign * 0.03 * m
    theta = _eye(len(x), x)
    theta[:, 1, 0] = s * W / H
    theta[:, 1, 2] = s * W / H
    return _affine(x, theta, fill)


def translate_x(x, m, sign, fill):
    theta = _eye(len(x), x)
    theta[:, 0, 2] = 2 * sign * 0.045 * m  # up to 45% of the width (normalised coordinates span 2)
    return _affine(x, theta, fill)


def translate_y(x, m, sign, fill):
    theta = _eye(len(x), x)
    theta[:, 1, 2] = 2 * sign * 0.045 * m
    return _affine(x, theta, fill)


# the "increasing" operation set of DeiT's rand-m9-mstd0.5-inc1: a larger magnitude is always a stronger change
RAND_AUGMENT_OPS = {
    "auto_contrast": auto_contrast, "equalize": equalize, "invert": invert, "rotate": rotate,
    "posterize": posterize, "solarize": solarize, "solarize_add": solarize_add, "color": color,
    "contrast": contrast, "brightness": brightness, "sharpness": sharpness, "shear_x": shear_x,
    "shear_y": shear_y, "translate_x": translate_x, "translate_y": translate_y,
}


class RandAugment:
    """Batch-wise RandAugment: `num_ops` rounds; in each, every sample draws its own operation, applies it with
    probability `prob` at magnitude N(magnitude, magnitude_std) clipped to [0, 10], with a random sign where the
    operation has a direction.

    Args:
        num_ops: operations per image (2 in DeiT).
        magnitude: strength on the 0..10 scale (9 in DeiT).
        magnitude_std: per-application noise on the magnitude (0.5 in DeiT).
        prob: chance that a drawn operation is applied (0.5, as in the implementation DeiT uses).
        fill: (R, G, B) 0..255 colour of the pixels that geometric operations bring in (the mean image colour).
        ops: names from RAND_AUGMENT_OPS; all of them by default.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        fill: Sequence[float] = (124.0, 116.0, 104.0),
        ops: Optional[Sequence[str]] = None,
    ):
        unknown = sorted(set(ops or ()) - set(RAND_AUGMENT_OPS))
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; choose from {', '.join(RAND_AUGMENT_OPS)}")
        if not 0 <= magnitude <= 10:
            raise ValueError(f"RandAugment magnitude is on a 0..10 scale, got {magnitude}")
        if num_ops < 0 or not 0.0 <= prob <= 1.0:
            raise ValueError(f"need num_ops >= 0 and prob in [0, 1], got {num_ops} and {prob}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.fill = tuple(float(f) for f in fill)
        self.ops = [RAND_AUGMENT_OPS[name] for name in (ops or RAND_AUGMENT_OPS)]

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, H, W) pixel values in [0, 255] (uint8 or float) -> float (B, 3, H, W) in [0, 255]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment expects RGB images (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(torch.float32, copy=True)  # the operations write into x: never into the caller's batch
        B, device = x.shape[0], x.device
        fill = torch.tensor(self.fill, device=device)
        for _ in range(self.num_ops):
            op_idx = (_rand(B, device, generator) * len(self.ops)).long().clamp_max(len(self.ops) - 1)  # (B,)
            applied = _rand(B, device, generator) < self.prob  # (B,)
            m = (self.magnitude + self.magnitude_std * _randn((B,), device, generator)).clamp(0, 10)  # (B,)
            sign = torch.where(_rand(B, device, generator) < 0.5, -1.0, 1.0).to(device)  # (B,)
            for k, op in enumerate(self.ops):
                sel = torch.nonzero(applied & (op_idx == k)).squeeze(1)  # samples that drew op k this round
                if sel.numel():
                    x[sel] = op(x[sel], m[sel], sign[sel], fill)
        return x


# ----------------------------------------------------------------------------------------------------------
# random erasing


def random_erasing(
    images: torch.Tensor,
    prob: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Zhong et al. 2020: with probability `prob` per image, replace one rectangle of area share ~ U(area) and log
    aspect ratio ~ U(log aspect) by unit normal noise ("pixel" mode, as in DeiT). Use on normalised images.
    Ten candidate rectangles are drawn per image; the first that fits is erased (none fits: the image is kept)."""
    if prob <= 0:
        return images
    B, C, H, W = images.shape
    device, tries = images.device, 10
    share = area[0] + (area[1] - area[0]) * _rand(B * tries, device, generator)  # (B*tries,)
    log_a = math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * _rand(B * tries, device, generator)
    h = (share * H * W * log_a.exp()).sqrt().round().view(B, tries)  # (B, tries)
    w = (share * H * W / log_a.exp()).sqrt().round().view(B, tries)
    fits = (h < H) & (w < W) & (h > 0) & (w > 0)  # (B, tries)
    first = torch.where(fits, torch.arange(tries, device=device), tries).amin(dim=1)  # (B,) first fitting try
    ok = (first < tries) & (_rand(B, device, generator) < prob)  # (B,)
    pick = first.clamp_max(tries - 1)[:, None]
    h, w = h.gather(1, pick).squeeze(1), w.gather(1, pick).squeeze(1)  # (B,)
    top = ((H - h + 1) * _rand(B, device, generator)).floor()  # (B,) uniform in 0..H-h
    left = ((W - w + 1) * _rand(B, device, generator)).floor()
    rows = torch.arange(H, device=device).view(1, H, 1)
    cols = torch.arange(W, device=device).view(1, 1, W)
    inside = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
    inside = inside & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))  # (B, H, W)
    mask = (inside & ok.view(-1, 1, 1)).unsqueeze(1)  # (B, 1, H, W)
    noise = _randn(images.shape, device, generator).to(images.dtype)  # (B, C, H, W)
    return torch.where(mask, noise, images)


# ----------------------------------------------------------------------------------------------------------
# Mixup and CutMix


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) labels -> (B, K) targets: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(H: int, W: int, lam: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 - lam) of the image, centred uniformly, clipped at the
    borders (so the area actually cut can be smaller: the caller recomputes lambda from the box)."""
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(H * ratio), int(W * ratio)
    cy, cx = int(torch.randint(0, H, (1,))), int(torch.randint(0, W, (1,)))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    return top, bottom, left, right


class MixupCutmix:
    """Per batch, with probability `prob`: CutMix (with probability `switch_prob` when both are on) or Mixup, each
    sample mixed with its mirror in the batch (sample i with sample B-1-i), lambda ~ Beta(alpha, alpha).

    Targets are mixed with the same lambda as the pixels: for CutMix, lambda is recomputed as the share of pixels
    that stayed after the box was clipped at the border. Label smoothing is folded into the targets.

    Args:
        num_classes: size of the target vectors.
        mixup_alpha: Beta parameter of Mixup's lambda (0.8 in DeiT; 0 = off).
        cutmix_alpha: Beta parameter of CutMix's lambda (1.0 in DeiT; 0 = off).
        prob: chance that a batch is mixed at all (1.0 in DeiT).
        switch_prob: chance of CutMix rather than Mixup when both are on (0.5 in DeiT).
        label_smoothing: smoothing of the one-hot targets before mixing (0.1 in DeiT).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ):
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0 = off), got {mixup_alpha}, {cutmix_alpha}")
        for name, p in (("prob", prob), ("switch_prob", switch_prob), ("label_smoothing", label_smoothing)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """images (B, C, H, W) float, labels (B,) -> (mixed images, targets (B, K) summing to 1, lambda).

        One lambda and one choice per batch (as in DeiT), drawn on the CPU from torch's global generator, which
        the run's seed seeds."""
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"expected images (B, C, H, W) and labels (B,), got {tuple(images.shape)}, {tuple(labels.shape)}")
        lam = 1.0
        if self.enabled and torch.rand(1).item() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (
                self.mixup_alpha == 0 or torch.rand(1).item() < self.switch_prob
            )
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(torch.distributions.Beta(alpha, alpha).sample())
            partner = images.flip(0)  # (B, C, H, W) sample B-1-i for sample i
            if use_cutmix:
                H, W = images.shape[-2:]
                top, bottom, left, right = cutmix_box(H, W, lam)
                images = images.clone()
                images[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
                lam = 1.0 - (bottom - top) * (right - left) / (H * W)  # the pixels that actually stayed
            else:
                images = lam * images + (1.0 - lam) * partner
        y = smooth_one_hot(labels, self.num_classes, self.label_smoothing)  # (B, K)
        return images, lam * y + (1.0 - lam) * y.flip(0), lam
