"""Decoding a JPEG at only the resolution its crop needs, against the full decode + crop it stands for.

The crop box is drawn before decoding (from the header's size), then the JPEG is decoded at the smallest of
transforms.DCT_SCALES (1, 1/2, 1/4, 1/8) that keeps `size` pixels across the crop. Tolerance: where that scale
is 1 the result is the full decode + crop + resize, bit for bit; where it is smaller, libjpeg's DCT-domain
downscale replaces part of the antialiased resize, a few grey levels apart on average (3.7 on the ImageNet
sample photos at 64-112 px; under 6 on the textured pictures here).
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import pytest
from PIL import Image

from data_pipelines import transforms
from data_pipelines.transforms import (
    DCT_SCALES,
    _dct_scale,
    _resize_box,
    decode_eval,
    decode_train,
    random_resized_crop_box,
)

pytestmark = pytest.mark.skipif(transforms.simplejpeg is None, reason="simplejpeg is not installed")


def _photo_jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-sized JPEG with smooth colour fields and 4-px texture (chroma subsampling and IDCT have work)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    base = np.stack([x, y, 255 - x], -1)
    noise = rng.normal(0, 12, (h // 4 + 1, w // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:h, :w]
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _scale_of(w: int, h: int, box, size: int) -> float:
    return _dct_scale(w, h, math.ceil(w * size / (box[2] - box[0])), math.ceil(h * size / (box[3] - box[1])))


def test_dct_scale_is_the_smallest_fast_one_that_keeps_the_crop_resolution():
    rng = random.Random(0)
    seen = set()
    for size in (224, 112, 48, 16):
        for _ in range(500):
            box = random_resized_crop_box(500, 375, rng)
            s = _scale_of(500, 375, box, size)
            seen.add(s)
            assert s in DCT_SCALES
            # the decoded crop keeps `size` pixels each way, and the next smaller scale would not
            assert (box[2] - box[0]) * s >= size - 1e-6 or s == 1.0
            assert (box[3] - box[1]) * s >= size - 1e-6 or s == 1.0
            if s > DCT_SCALES[-1]:  # half of it would decode fewer pixels than the crop needs
                need_w, need_h = math.ceil(500 * size / (box[2] - box[0])), math.ceil(375 * size / (box[3] - box[1]))
                assert 500 * s / 2 < need_w or 375 * s / 2 < need_h
    assert seen == set(DCT_SCALES)
    assert _dct_scale(500, 375, 2000, 100) == 1.0  # an upscaling crop: full size, never more


@pytest.mark.parametrize("size", [224, 112, 40])
def test_jpeg_is_decoded_at_a_fast_dct_scale(monkeypatch, size):
    """7/8, 3/4, 5/8 and 3/8 are slower than the full decode in libjpeg-turbo: never ask for them."""
    data = _photo_jpeg(500, 375)
    shapes = []
    decode = transforms.simplejpeg.decode_jpeg

    def recording(*args, **kwargs):
        out = decode(*args, **kwargs)
        shapes.append(out.shape[:2])
        return out

    monkeypatch.setattr(transforms.simplejpeg, "decode_jpeg", recording)
    for seed in range(60):
        decode_train(data, size, random.Random(seed))
    decode_eval(data, size)
    allowed = {(math.ceil(375 * s), math.ceil(500 * s)) for s in DCT_SCALES}
    assert len(shapes) == 61 and set(shapes) <= allowed, set(shapes) - allowed


@pytest.mark.parametrize("wh", [(500, 375), (500, 333), (333, 500)])
@pytest.mark.parametrize("size", [224, 96])
@pytest.mark.parametrize("fast", [True, False])
def test_crop_decode_matches_full_decode_then_crop(wh, size, fast):
    w, h = wh
    data = _photo_jpeg(w, h, seed=w + h)
    full = transforms.simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast)  # (h, w, 3)
    scales = []
    for seed in range(30):
        out = decode_train(data, size, random.Random(seed), fast=fast)
        box = random_resized_crop_box(w, h, random.Random(seed))  # the same draw: the box is made before decoding
        ref = _resize_box(full, box, size)
        assert out.shape == ref.shape == (size, size, 3) and out.dtype == np.uint8
        scale = _scale_of(w, h, box, size)
        scales.append(scale)
        if scale == 1.0:
            assert np.array_equal(out, ref)
        else:
            assert np.abs(out.astype(int) - ref.astype(int)).mean() < 6
    assert 1.0 in scales and (size == 224 or min(scales) < 1.0)  # both branches were exercised where they exist


def test_full_scale_crop_matches_pillow_crop_and_resize():
    """An independent reference: Pillow's full decode, crop and antialiased bilinear resize (accurate IDCT)."""
    data = _photo_jpeg(500, 375, seed=3)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    for seed in range(10):
        box = random_resized_crop_box(500, 375, random.Random(seed))
        out = decode_train(data, 224, random.Random(seed), fast=False)
        ref = np.asarray(img.resize((224, 224), Image.BILINEAR, box=box))
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 0.5


def test_the_crop_box_draw_is_unchanged():
    """decode_train draws exactly what random_resized_crop_box draws, from the header's size, and nothing more."""
    data = _photo_jpeg(500, 333)
    a, b = random.Random(7), random.Random(7)
    for _ in range(20):
        decode_train(data, 112, a)
        random_resized_crop_box(500, 333, b)
    assert a.getstate() == b.getstate()


def test_corrupt_jpeg_is_an_error_for_the_stream_to_count():
    """ShardStream counts and skips a sample whose decode raises; a damaged JPEG must raise, not decode grey."""
    data = _photo_jpeg(500, 375)
    broken = data[:200] + bytes(range(256)) * 8 + data[2248:]  # garbage over the tables and the scan
    for bad, error in ((data[: len(data) // 3], "Premature end"), (broken, "cannot")):
        with pytest.raises((ValueError, OSError), match=error):
            decode_train(bad, 224, random.Random(0))


def test_truncated_jpeg_in_a_shard_is_skipped_and_counted(tmp_path):
    from data_pipelines.samples import ImageLabelDecoder
    from data_pipelines.streaming import ShardStream

    from .conftest import write_tar

    samples = [{"__key__": f"s{i:04d}", "jpg": _photo_jpeg(100, 75, seed=i), "cls": str(i).encode()} for i in range(8)]
    samples[5]["jpg"] = samples[5]["jpg"][: len(samples[5]["jpg"]) // 2]  # header intact, the scan cut short
    write_tar(tmp_path / "train-000000.tar", samples)
    ds = ShardStream(str(tmp_path / "train-000000.tar"), ImageLabelDecoder(32), batch_size=1, train=True,
                     shuffle_buffer=4, max_error_rate=0.5)
    labels = sorted(torch.cat([y for _, y in ds]).tolist())
    assert labels == [0, 1, 2, 3, 4, 6, 7]
    assert ds.stats.summary()["errors"] == 1
