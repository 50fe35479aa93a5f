"""Decode on the CPU to uint8, augment and normalise on the accelerator.

The split follows the usual recipe for fast vision input pipelines (e.g. FFCV, DALI): the CPU does only
what must happen per image — JPEG decode by libjpeg-turbo at no more than the resolution the crop needs
(its DCT scaling), a random-resized crop (Szegedy et al. 2015, "Going deeper with convolutions"; the
Inception crop used by ViT/DeiT) done as a single antialiased resize, and a uint8 tensor. The
batch then travels as uint8 (4x less than float32) and flips and normalisation run batch-wise on the
accelerator with `random_hflip` and `normalize`.
"""

from __future__ import annotations

import io
import math
import random
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # libjpeg-turbo straight to numpy; Pillow decodes JPEGs where it is missing
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency; this keeps odd platforms working
    simplejpeg = None

# per-channel statistics of common corpora (RGB, in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # maps [0, 1] to [-1, 1]; the original ViT's choice
}

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# images whose decode would hold more pixels than this are refused (a counted skip): a small PNG file can
# expand to gigabytes ("decompression bomb") well below Pillow's own limit of ~89 Mpx. JPEGs are judged by
# their size after DCT scaling, which a small crop of a large photo keeps small.
MAX_IMAGE_PIXELS = 32_000_000


def mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a named normalisation: one of NORMALIZATIONS."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


# ----------------------------------------------------------------------------------------------------------
# CPU side: bytes -> uint8 (H, W, 3)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of an Inception-style crop: area share ~ U(scale), log aspect ~ U(log ratio)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = rng.randint(0, width - w)
            y = rng.randint(0, height - h)
            return x, y, x + w, y + h
    # fallback: the largest central crop whose aspect lies within `ratio`
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def center_crop_box(width: int, height: int, crop_pct: float = 0.875) -> tuple[float, float, float, float]:
    """Central square whose side is `crop_pct` of the shorter side (resize-then-center-crop in one box)."""
    side = min(width, height) * crop_pct
    x, y = (width - side) / 2, (height - side) / 2
    return x, y, x + side, y + side


def _resize_box(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Crop `box` (left, top, right, bottom; rounded to whole pixels) out of uint8 (H, W, 3) and resize it to
    (size, size, 3) with antialiased bilinear filtering (Pillow's filter, in torch's SIMD uint8 kernel: about
    2x faster than Pillow's own resize)."""
    h, w = image.shape[:2]
    x0, y0 = min(int(round(box[0])), w - 1), min(int(round(box[1])), h - 1)
    x1, y1 = max(int(round(box[2])), x0 + 1), max(int(round(box[3])), y0 + 1)
    region = image[y0:y1, x0:x1]  # (h', w', 3), a view
    if region.shape[:2] == (size, size):
        return np.ascontiguousarray(region)
    # (1, 3, h', w') uint8 in channels-last memory: one copy of the crop's rows, which buys torch's SIMD uint8
    # path (a strided view of the larger image takes its generic one: 1.5x the time for 224 px out of 500x375)
    crop = torch.from_numpy(region).permute(2, 0, 1)[None].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()  # (size, size, 3) uint8


def _refuse_large(width: int, height: int, scale: float, max_pixels: Optional[int]) -> None:
    decoded = math.ceil(width * scale) * math.ceil(height * scale)
    if max_pixels is not None and decoded > max_pixels:
        at = f" at DCT scale {scale:g}" if scale != 1 else ""
        raise ValueError(
            f"image is {width}x{height}: decoding it{at} means {decoded} pixels, more than "
            f"max_image_pixels={max_pixels}"
        )


# The DCT scales a JPEG is decoded at. libjpeg-turbo offers every M/8, but only 1/2, 1/4 and 1/8 have fast
# reduced IDCTs: 7/8, 3/4, 5/8 and 3/8 run a generic scaled IDCT that costs more than the full-size decode (on
# the 500x375 ImageNet photos, fast IDCT, one core: 7/8 at 57% of the full decode's images/s, 3/4 at 72%, 5/8
# at 82%, 3/8 below 1/2). A crop that needs more than half the resolution is decoded in full and resized.
DCT_SCALES = (1.0, 0.5, 0.25, 0.125)


def _dct_scale(width: int, height: int, min_width: int, min_height: int) -> float:
    """The scale a JPEG is decoded at for these minimum sizes: the smallest of DCT_SCALES that keeps them."""
    need = max(min_width / width, min_height / height)
    return min((s for s in DCT_SCALES if s >= need - 1e-9), default=1.0)


def _rgb8(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) of any Pillow image. 16- and 32-bit greyscale (PNG's I;16 opens as I;16 or I) is scaled
    from 0..65535 to 0..255 (Pillow's convert('RGB') clips it at 255: mid-grey came out white); float images are
    taken as 0..1 when they lie in it, else as 0..255."""
    if img.mode == "RGB":
        return np.array(img)
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img).astype(np.float64)  # (H, W)
        if img.mode == "F":
            peak = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        else:
            peak = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.array(img.convert("RGB"))  # palette, CMYK, RGBA, LA, L, 1


def _decode_jpeg_turbo(data: bytes, size: int, box_fn, fast: bool, max_pixels: Optional[int]):
    """libjpeg-turbo through simplejpeg: straight to an RGB array, at the smallest DCT scale (1, 1/2, 1/4, 1/8:
    DCT_SCALES) at which the crop keeps `size` pixels per side; `fast` takes libjpeg's fast integer IDCT and
    plain chroma upsampling. None where simplejpeg is missing or the JPEG is one it does not convert faithfully
    (CMYK/YCCK: Pillow handles Adobe's inverted CMYK)."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # let Pillow read it, or say why it cannot
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    box = box_fn(width, height)
    if box is None:
        _refuse_large(width, height, 1.0, max_pixels)
        return _exact_size(simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast), size), None
    cw, ch = box[2] - box[0], box[3] - box[1]
    scale = _dct_scale(width, height, math.ceil(width * size / cw), math.ceil(height * size / ch))
    _refuse_large(width, height, scale, max_pixels)
    # simplejpeg takes the smallest M/8 whose output keeps these sizes: exactly `scale` (for sides >= 8 px)
    image = simplejpeg.decode_jpeg(
        data, colorspace="RGB", fastdct=fast, fastupsample=fast,
        min_width=math.ceil(width * scale), min_height=math.ceil(height * scale),
    )  # (h, w, 3) uint8, h = ceil(height * scale)
    sx, sy = image.shape[1] / width, image.shape[0] / height
    return image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _exact_size(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] != (size, size):
        raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, expected {size}x{size}")
    return image


def decode_crop(
    data: bytes, size: int, box_fn, fast: bool = False, max_pixels: Optional[int] = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode image bytes, crop `box_fn(width, height)` and resize it to (size, size) -> uint8 (size, size, 3).

    The JPEG decoder is asked for the smallest DCT scale (1, 1/2, 1/4, 1/8) at which the crop still has at
    least `size` pixels on each side, so a large photo cropped to a small box is never decoded in full.
    JPEGs go through libjpeg-turbo by simplejpeg, which writes RGB straight into the array (Pillow decodes
    to its own RGBX buffer and copies out: 15-25% slower per photo); other formats, and JPEG colour spaces
    simplejpeg does not handle, through Pillow (with `Image.draft` for the DCT scale). `box_fn` returning
    None means "no crop, the image must already be (size, size)". `fast=True` trades libjpeg's accurate IDCT
    and fancy chroma upsampling for the fast ones: 13% less decode time, differences of a few grey levels at
    colour edges, far below what training augmentation does to an image (Pillow's path ignores it).
    An image whose decode would hold more than `max_pixels` pixels is refused with a ValueError (the stream
    counts it as a skipped sample) before any pixel is decoded; None lifts the limit.
    """
    decoded = _decode_jpeg_turbo(data, size, box_fn, fast, max_pixels)
    if decoded is not None:
        image, box = decoded
        return image if box is None else _resize_box(image, box, size)
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    box = box_fn(width, height)
    if box is not None and img.format == "JPEG":
        cw, ch = box[2] - box[0], box[3] - box[1]
        img.draft(img.mode, (max(1, math.ceil(width * size / cw)), max(1, math.ceil(height * size / ch))))
        sx, sy = img.size[0] / width, img.size[1] / height
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    _refuse_large(*img.size, 1.0, max_pixels)  # after draft: the size the decoder will produce
    image = _rgb8(img)
    if box is None:
        return _exact_size(image, size)
    return _resize_box(image, box, size)


def decode_train(
    data: bytes,
    size: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    fast: bool = True,
    max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Training view: random-resized crop to (size, size), uint8 (size, size, 3); by default with the fast
    JPEG decoder (see `decode_crop`), which evaluation views never use."""
    box_fn = lambda w, h: random_resized_crop_box(w, h, rng, scale, ratio)  # noqa: E731
    return decode_crop(data, size, box_fn, fast=fast, max_pixels=max_pixels)


def decode_eval(
    data: bytes, size: int, crop_pct: float = 0.875, max_pixels: Optional[int] = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Evaluation view: resize the shorter side to size/crop_pct, center crop (size, size); images already
    at (size, size) are only decoded."""

    def box(w: int, h: int):
        return None if (w, h) == (size, size) else center_crop_box(w, h, crop_pct)

    return decode_crop(data, size, box, max_pixels=max_pixels)


def image_bytes(sample: dict) -> bytes:
    """The image member of a sample (jpg, jpeg, png or webp)."""
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    raise KeyError(f"no image member ({'/'.join(IMAGE_KEYS)}) in sample; it has {sorted(k for k in sample if not k.startswith('__'))}")


# ----------------------------------------------------------------------------------------------------------
# accelerator side: uint8 batches -> float batches, pure torch


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> `dtype` (B, 3, H, W), (x / 255 - mean) / std, on the images' device."""
    if images.dim() != 4 or images.shape[1] != len(mean):
        raise ValueError(f"expected images of shape (B, {len(mean)}, H, W), got {tuple(images.shape)}")
    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0  # (1, C, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0  # (1, C, 1, 1)
    return ((images.float() - m) / s).to(dtype)  # (B, C, H, W)


def random_hflip(images: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image of a (B, C, H, W) batch left-right independently with probability p."""
    gen_device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=gen_device).to(images.device) < p  # (B,)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)  # (B, C, H, W)
