"""CPU decode (draft mode, crops) and accelerator batch ops (normalize, random_hflip)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

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
