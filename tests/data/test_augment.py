"""Batch augmentations: Mixup/CutMix targets against the pixels actually mixed, RandAugment's operations against
Pillow's, random erasing and repeated augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data_pipelines.augment import (
    RAND_AUGMENT_OPS,
    MixupCutmix,
    RandAugment,
    random_erasing,
    repeat_batch,
    smooth_one_hot,
)

# ---- Mixup / CutMix ------------------------------------------------------------------------------------------


def two_class_batch(B: int = 6, H: int = 12, W: int = 10):
    """Sample i is a constant image of value i; sample i has label i (so mixing is readable from the pixels)."""
    images = torch.arange(B, dtype=torch.float).view(B, 1, 1, 1).expand(B, 3, H, W).clone()
    return images, torch.arange(B)


@pytest.mark.parametrize("seed", range(12))
def test_mixup_cutmix_targets_sum_to_one_and_match_the_pixels(seed):
    torch.manual_seed(seed)
    B = 6
    images, labels = two_class_batch(B)
    mix = MixupCutmix(num_classes=B, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
    out, targets, lam = mix(images, labels)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    for i in range(B):
        j = B - 1 - i  # the partner: the batch mirrored
        own = targets[i, i].item() if i != j else 1.0
        assert own == pytest.approx(lam, abs=1e-6)
        if i == j:
            continue
        # share of sample i's own content in its mixed image: pixels equal to i (CutMix), or the blend (Mixup)
        cut = ((out[i] == i) | (out[i] == j)).all()
        share = (out[i] == i).float().mean().item() if cut else (out[i].mean().item() - j) / (i - j)
        assert share == pytest.approx(own, abs=1e-5)
        assert targets[i, j].item() == pytest.approx(1 - lam, abs=1e-6)


def test_cutmix_alone_recomputes_lambda_from_the_clipped_box():
    torch.manual_seed(3)
    images, labels = two_class_batch(4, 7, 9)  # odd sizes: the box is often clipped at the border
    mix = MixupCutmix(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    for _ in range(20):
        out, targets, lam = mix(images, labels)
        kept = (out[0] == 0).float().mean().item()
        assert kept == pytest.approx(lam, abs=1e-6) and targets[0, 0].item() == pytest.approx(lam, abs=1e-6)


def test_label_smoothing_is_folded_into_mixed_targets():
    torch.manual_seed(0)
    images, labels = two_class_batch(4)
    out, targets, lam = MixupCutmix(num_classes=5, label_smoothing=0.1)(images, labels)
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert targets[:, 4].tolist() == pytest.approx([0.02] * 4)  # a class nobody has: eps / K
    off = MixupCutmix(num_classes=5, prob=0.0, label_smoothing=0.1)(images, labels)
    assert off[2] == 1.0 and torch.equal(off[0], images)
    torch.testing.assert_close(off[1], smooth_one_hot(labels, 5, 0.1))


def test_bad_mixup_settings_are_clear_errors():
    with pytest.raises(ValueError, match="switch_prob"):
        MixupCutmix(num_classes=3, switch_prob=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        MixupCutmix(num_classes=3, mixup_alpha=-1)


# ---- RandAugment operations against Pillow's -----------------------------------------------------------------


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 24x24 RGB image with smooth structure plus noise (uint8, HWC)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:24, 0:24]
    base = np.stack([yy * 8, xx * 6 + 40, (yy + xx) * 3 + 60], -1) + rng.integers(-20, 20, (24, 24, 3))
    return base.clip(0, 255).astype(np.uint8)


def run_op(name: str, img: np.ndarray, m: float, sign: float = 1.0) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    out = RAND_AUGMENT_OPS[name](x, torch.tensor([m]), torch.tensor([sign]), torch.tensor([128.0, 128.0, 128.0]))
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "name, m, reference",
    [
        ("auto_contrast", 9, lambda im, m: ImageOps.autocontrast(im)),
        ("equalize", 9, lambda im, m: ImageOps.equalize(im)),
        ("invert", 9, lambda im, m: ImageOps.invert(im)),
        ("posterize", 9, lambda im, m: ImageOps.posterize(im, 4 - int(m * 0.4))),
        ("solarize", 5, lambda im, m: ImageOps.solarize(im, 256 - int(m * 25.6))),
        ("color", 9, lambda im, m: ImageEnhance.Color(im).enhance(1 + 0.09 * m)),
        ("contrast", 9, lambda im, m: ImageEnhance.Contrast(im).enhance(1 + 0.09 * m)),
        ("brightness", 9, lambda im, m: ImageEnhance.Brightness(im).enhance(1 + 0.09 * m)),
        ("sharpness", 9, lambda im, m: ImageEnhance.Sharpness(im).enhance(1 + 0.09 * m)),
    ],
)
def test_pixel_ops_match_pillow(photo, name, m, reference):
    expected = np.asarray(reference(Image.fromarray(photo), m)).astype(float)
    got = run_op(name, photo, m)
    assert np.abs(got - expected).max() <= 1.5, name  # Pillow rounds to integers at every step


def test_geometric_ops_move_content_and_fill_the_border(photo):
    moved = run_op("translate_x", photo, 25 / 3)  # 0.045 * m = 37.5% of 24 px = 9 px: the content moves left
    shift = 9
    assert np.abs(moved[:, : 24 - shift] - photo[:, shift:].astype(float)).max() < 1e-2
    assert np.allclose(moved[:, 24 - shift :], 128.0, atol=1e-2)  # brought in from outside: the fill colour
    assert np.allclose(run_op("rotate", photo, 0.0), photo, atol=1e-3)  # magnitude 0: identity
    assert np.allclose(run_op("shear_x", photo, 0.0), photo, atol=1e-3)


@pytest.fixture(scope="module")
def wide_photo() -> np.ndarray:
    """A 20x28 (not square, so the aspect ratio matters) RGB image: smooth structure plus noise."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:20, 0:28]
    base = np.stack([yy * 8, xx * 6 + 40, (yy + xx) * 3 + 60], -1) + rng.integers(-20, 20, (20, 28, 3))
    return base.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name, affine", [("shear_x", lambda s: (1, s, 0, 0, 1, 0)), ("shear_y", lambda s: (1, 0, 0, s, 1, 0))])
def test_shear_matches_pillow_affine_about_the_top_left_corner(wide_photo, name, affine, sign):
    """timm's shear is PIL's Image.transform(AFFINE, (1, s, 0, 0, 1, 0), BICUBIC): the top-left corner stays put.
    A centre pivot would be off by s * H / 2 = 2.7 px here (a mean error of tens of levels)."""
    m = 9.0
    img = Image.fromarray(wide_photo)
    ref = img.transform(img.size, Image.AFFINE, affine(sign * 0.03 * m), resample=Image.BICUBIC, fillcolor=(128,) * 3)
    got = run_op(name, wide_photo, m, sign)
    diff = np.abs(got - np.asarray(ref).astype(float))  # torch's cubic kernel (a = -0.75) is not Pillow's exactly
    assert diff.mean() < 1.5 and diff.max() < 12, (diff.mean(), diff.max())
    bilinear = img.transform(img.size, Image.AFFINE, affine(sign * 0.03 * m), resample=Image.BILINEAR, fillcolor=(128,) * 3)
    assert diff.mean() < np.abs(got - np.asarray(bilinear).astype(float)).mean()  # bicubic, as DeiT's recipe


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rotate_matches_pillow_about_the_centre(wide_photo, sign):
    img = Image.fromarray(wide_photo)
    ref = np.asarray(img.rotate(sign * 27.0, resample=Image.BICUBIC, fillcolor=(128,) * 3)).astype(float)
    diff = np.abs(run_op("rotate", wide_photo, 9.0, sign) - ref)
    assert diff.mean() < 1.5, diff.mean()


def test_bicubic_overshoot_is_clipped_into_pixel_range():
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)  # the worst case for a cubic kernel
    img = np.repeat(checker[..., None], 3, -1)
    for name in ("rotate", "shear_x", "shear_y", "translate_x"):
        out = run_op(name, img, 4.3)
        assert out.min() >= 0 and out.max() <= 255, name


def test_equalize_on_a_channels_last_batch():
    x = torch.randint(0, 256, (4, 3, 12, 10), dtype=torch.uint8).float()
    cl = x.to(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    args = torch.full((4,), 9.0), torch.ones(4), torch.full((3,), 128.0)
    torch.testing.assert_close(RAND_AUGMENT_OPS["equalize"](cl, *args), RAND_AUGMENT_OPS["equalize"](x, *args))
    out = RandAugment(num_ops=2, prob=1.0)(cl.to(torch.uint8), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 255  # every operation takes channels-last


def test_rand_augment_batch_is_per_sample_and_in_range():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    out = RandAugment(num_ops=2, magnitude=9, prob=0.5)(images, generator=g)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 255
    changed = (out != images.float()).flatten(1).any(1)  # (B,)
    assert 0 < changed.sum() < 32  # each sample draws its own (prob 0.5 twice: about a quarter untouched)
    again = RandAugment(num_ops=2, magnitude=9, prob=0.5)(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)  # the generator makes it reproducible
    assert torch.equal(RandAugment(num_ops=0)(images), images.float())
    floats = images.float()
    RandAugment(prob=1.0)(floats)
    assert torch.equal(floats, images.float())  # the caller's batch is left alone


def test_rand_augment_bad_settings():
    with pytest.raises(ValueError, match="0..10"):
        RandAugment(magnitude=12)
    with pytest.raises(ValueError, match="choose from"):
        RandAugment(ops=["blur"])


# ---- random erasing, repeated augmentation -------------------------------------------------------------------


def test_random_erasing_replaces_one_rectangle_of_the_right_size():
    g = torch.Generator().manual_seed(0)
    images = torch.full((64, 3, 20, 20), 7.0)
    out = random_erasing(images, prob=1.0, generator=g)
    erased = (out != 7.0).all(1)  # (B, H, W): noise on all channels
    for b in range(64):
        rows, cols = erased[b].any(1).nonzero(), erased[b].any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert erased[b].sum() == h * w  # one full rectangle
        assert 0.02 * 400 * 0.5 <= h * w <= 400 / 3 + 20  # area share within bounds (up to rounding)
    assert torch.equal(random_erasing(images, prob=0.0), images)
    some = random_erasing(torch.full((400, 3, 8, 8), 7.0), prob=0.25, generator=g)
    share = (some != 7.0).flatten(1).any(1).float().mean().item()
    assert 0.15 < share < 0.35


def test_repeat_batch_keeps_the_size_and_repeats_in_a_row():
    images, labels = torch.arange(7).view(7, 1, 1, 1).float(), torch.arange(7)
    out, lab = repeat_batch(images, labels, 3)
    assert lab.tolist() == [0, 0, 0, 1, 1, 1, 2] and out.flatten().tolist() == lab.float().tolist()
    assert repeat_batch(images, labels, 1)[1] is labels
    with pytest.raises(ValueError, match="repeats"):
        repeat_batch(images, labels, 0)
