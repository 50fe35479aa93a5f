"""CPU decode (libjpeg-turbo and Pillow paths, DCT scaling, crops) and accelerator batch ops (normalize, random_hflip)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines import transforms
from data_pipelines.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_crop,
    decode_eval,
    decode_train,
    mean_std,
    normalize,
    random_hflip,
    random_resized_crop_box,
)


def _encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def _gradient(w: int, h: int) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)  # (h, w, 3)


def test_crop_boxes_are_inside_and_within_ranges():
    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_crop_box(500, 375, rng, scale=(0.08, 1.0))
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375
        area = (x1 - x0) * (y1 - y0) / (500 * 375)
        assert 0.07 < area <= 1.0 and 0.7 < (x1 - x0) / (y1 - y0) < 1.4


def test_draft_decode_matches_full_decode():
    arr = _gradient(640, 480)
    data = _encode(arr)
    box = (0, 0, 640, 480)
    fast = decode_crop(data, 64, lambda w, h: box)  # DCT-scaled by 1/8: 80x60 decoded
    img = Image.open(io.BytesIO(data)).convert("RGB")
    slow = np.asarray(img.resize((64, 64), Image.BILINEAR, box=box))
    assert fast.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 4


def _photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus texture: JPEG chroma subsampling and IDCT both have work to do."""
    rng = np.random.default_rng(seed)
    base = _gradient(w, h).astype(np.float32)
    noise = rng.normal(0, 12, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.skipif(transforms.simplejpeg is None, reason="simplejpeg is not installed")
@pytest.mark.parametrize("out_size", [96, 40])  # full-scale decode, and a 1/4 DCT-scaled one
def test_turbo_path_matches_pillow_path(monkeypatch, out_size):
    data = _encode(_photo_like(400, 300))
    box = (50, 30, 370, 270)
    turbo = decode_crop(data, out_size, lambda w, h: box)
    monkeypatch.setattr(transforms, "simplejpeg", None)
    pillow = decode_crop(data, out_size, lambda w, h: box)
    assert turbo.shape == pillow.shape == (out_size, out_size, 3) and turbo.dtype == np.uint8
    assert np.abs(turbo.astype(int) - pillow.astype(int)).mean() < 1.0  # same libjpeg, same filter


@pytest.mark.skipif(transforms.simplejpeg is None, reason="simplejpeg is not installed")
def test_fast_decode_is_close_to_accurate_and_used_for_training_views_only():
    data = _encode(_photo_like(320, 240))
    box = lambda w, h: (0, 0, w, h)  # noqa: E731
    accurate = decode_crop(data, 240, box)
    fast = decode_crop(data, 240, box, fast=True)
    diff = np.abs(accurate.astype(int) - fast.astype(int))
    assert 0 < diff.mean() < 3  # a different decoder, a few grey levels apart
    # eval views are accurate; train views default to fast
    assert np.array_equal(decode_eval(data, 240, crop_pct=1.0), decode_crop(data, 240, lambda w, h: (40, 0, 280, 240)))
    whole = (0.999, 1.0)  # the whole 4:3 frame at a 4:3 ratio: the crop box is (0, 0, 320, 240)
    assert np.array_equal(decode_train(data, 240, random.Random(0), whole, (4 / 3, 4 / 3)), decode_crop(data, 240, box, True))


def test_resize_matches_pillow_antialiased_bilinear():
    arr = _photo_like(300, 200)
    for size, box in [(64, (10, 20, 250, 190)), (128, (0, 0, 300, 200)), (48, (100, 50, 130, 80))]:  # down, down, up
        ours = transforms._resize_box(arr, box, size)
        ref = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR, box=box))
        assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.0


def test_image_of_wrong_size_without_crop_is_an_error():
    for fmt in ("JPEG", "PNG"):  # libjpeg-turbo's path and Pillow's
        with pytest.raises(ValueError, match="20x16, expected 16x16"):
            decode_crop(_encode(_gradient(20, 16), fmt), 16, lambda w, h: None)


def test_train_and_eval_views():
    rng = random.Random(1)
    data = _encode(_gradient(120, 90))
    assert decode_train(data, 32, rng).shape == (32, 32, 3)
    out = decode_eval(data, 32, crop_pct=1.0)
    assert out.shape == (32, 32, 3)
    # already at size: only decoded, pixels unchanged
    arr = _gradient(16, 16)
    png = _encode(arr, "PNG")
    assert np.array_equal(decode_eval(png, 16), arr)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(_gradient(20, 20)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    assert decode_eval(buf.getvalue(), 16).shape == (16, 16, 3)


def test_normalize_matches_reference():
    x = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    ref = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = normalize(x, IMAGENET_MEAN, IMAGENET_STD)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    assert normalize(x, *mean_std("half"), dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="shape"):
        normalize(x[:, :2])
    with pytest.raises(ValueError, match="imagenet"):
        mean_std("nope")


def test_random_hflip_flips_each_sample_independently():
    x = torch.arange(16 * 3 * 2 * 4, dtype=torch.int64).view(16, 3, 2, 4).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_hflip(x, generator=g)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(16)]
    kept = [torch.equal(out[i], x[i]) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 16
    assert torch.equal(random_hflip(x, p=0.0), x) and torch.equal(random_hflip(x, p=1.0), x.flip(-1))


# ---------------------------------------------------------------------------------------------- hostile images


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    """Issue 14, finding 8: convert('RGB') clips I;16 data at 255, so a mid-grey 16-bit PNG decoded as white."""
    grey = np.full((16, 16), 32896, dtype=np.uint16)  # 32896 / 65535 = 128 / 255
    grey[:, :8] = 65535
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    out = decode_eval(buf.getvalue(), 16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    assert (out[:, 8:] == 128).all() and (out[:, :8] == 255).all()


def test_images_too_large_to_decode_are_refused_but_large_jpegs_decode_small():
    """Issue 14, finding 13: a PNG 'bomb' under Pillow's own limit cost gigabytes per sample. Images whose decode
    would exceed max_pixels are refused (the stream counts it as a skip); a JPEG is judged by its size after DCT
    scaling, which a small crop keeps small."""
    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 7).save(buf, format="PNG")  # 9 Mpx that compress to a few kB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ValueError, match=r"3000x3000.*max_image_pixels=4000000"):
        decode_eval(buf.getvalue(), 8, max_pixels=4_000_000)
    with pytest.raises(ValueError, match="max_image_pixels"):
        decode_train(buf.getvalue(), 8, random.Random(0), max_pixels=4_000_000)
    big_jpeg = _encode(_gradient(3000, 3000))
    assert decode_train(big_jpeg, 8, random.Random(0), scale=(0.5, 1.0), max_pixels=4_000_000).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="max_image_pixels"):
        decode_train(big_jpeg, 2000, random.Random(0), max_pixels=4_000_000)  # a full decode is needed: refused
    assert decode_eval(buf.getvalue(), 8).shape == (8, 8, 3)  # under the default limit
