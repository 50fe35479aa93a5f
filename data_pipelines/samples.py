"""What a sample carries, per family: image + class label (ViT, DeiT) or image + caption (CLIP).

The streaming layer (`streaming.py`) is the same for every family; these decoders are the only place the
families differ: which members a sample must have, how it becomes an item, what a padding item is, and how
items become a batch.

* image-label: members `jpg` (or png/webp) + `cls` (ascii integer) -> (uint8 (B, 3, S, S), int64 (B,));
  padding items have label IGNORE_INDEX.
* image-text: members `jpg` + `txt` (one caption per line; `json` optional) as img2dataset writes them ->
  (uint8 (B, 3, S, S), list of B captions or int64 (B, L) tokens, bool (B,) valid); padding items have an
  empty caption and valid False.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from .constants import IGNORE_INDEX
from .transforms import IMAGE_KEYS, MAX_IMAGE_PIXELS, decode_eval, decode_train, image_bytes

CAPTION_CHOICES = ("random", "first", "cycle")


class SampleDecoder(Protocol):
    """What a family of samples needs: which members it requires, how to decode one, how to batch."""

    def check(self, sample: dict) -> Optional[str]:
        """None if the sample has what decoding needs, else what is missing."""

    def decode(self, sample: dict, rng: random.Random, epoch: int, train: bool) -> Any:
        """Sample dict -> one item; may raise on corrupt data (counted and skipped)."""

    def pad(self) -> Any:
        """A padding item (validation under data parallelism)."""

    def collate(self, items: list) -> Any:
        """A list of items -> one batch."""


def caption_lines(txt: bytes) -> list[str]:
    """The captions of a `txt` member: one per line, split at newlines only (str.splitlines would also split
    at U+2028, U+0085, form feeds, ... that a caption may contain), stripped, empty lines dropped."""
    return [c.strip() for c in txt.decode("utf-8").split("\n") if c.strip()]


def _missing(sample: dict, required: Sequence[str]) -> Optional[str]:
    if not any(k in sample for k in IMAGE_KEYS):
        return f"{sample.get('__key__')}: no image member ({'/'.join(IMAGE_KEYS)})"
    for key in required:
        if key not in sample:
            return f"{sample.get('__key__')}: no '{key}' member"
    return None


def _stack_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """(S, S, 3) uint8 arrays -> contiguous (B, 3, S, S) uint8; numpy's strided copy is several times
    faster here than torch's permute().contiguous() on uint8."""
    h, w, c = arrays[0].shape
    out = np.empty((len(arrays), c, h, w), dtype=np.uint8)  # (B, 3, S, S)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1)
    return torch.from_numpy(out)


class ImageDecoder:
    """The image half shared by both families: train view (random-resized crop) or eval view."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        eval_crop_pct: float = 0.875,
        fast_train_decode: bool = True,
        max_image_pixels: Optional[int] = MAX_IMAGE_PIXELS,
    ):
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0.0 < eval_crop_pct <= 1.0:
            raise ValueError(f"eval_crop_pct must be in (0, 1], got {eval_crop_pct}")
        self.image_size = image_size
        self.crop_scale, self.crop_ratio, self.eval_crop_pct = tuple(crop_scale), tuple(crop_ratio), eval_crop_pct
        self.fast_train_decode = fast_train_decode  # libjpeg's fast IDCT for training views (transforms.decode_crop)
        self.max_image_pixels = max_image_pixels  # larger decodes are refused: a counted skip

    def image(self, sample: dict, rng: random.Random, train: bool) -> np.ndarray:
        data = image_bytes(sample)
        if train:
            return decode_train(data, self.image_size, rng, self.crop_scale, self.crop_ratio, self.fast_train_decode,
                                self.max_image_pixels)
        return decode_eval(data, self.image_size, self.eval_crop_pct, self.max_image_pixels)

    def blank(self) -> np.ndarray:
        return np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)


class ImageLabelDecoder(ImageDecoder):
    """`jpg` + `cls` -> (uint8 image (S, S, 3), int label); batches (uint8 (B, 3, S, S), int64 (B,))."""

    def __init__(self, *args, num_classes: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def check(self, sample: dict) -> Optional[str]:
        return _missing(sample, ("cls",))

    def decode(self, sample: dict, rng: random.Random, epoch: int, train: bool):
        label = int(sample["cls"].decode("ascii").strip())
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} outside [0, {self.num_classes})")
        return self.image(sample, rng, train), label

    def pad(self):
        return self.blank(), IGNORE_INDEX

    def collate(self, items: list):
        images = _stack_images([im for im, _ in items])  # (B, 3, S, S) uint8
        labels = torch.tensor([lab for _, lab in items], dtype=torch.int64)  # (B,)
        return images, labels


class ImageTextDecoder(ImageDecoder):
    """`jpg` + `txt` -> (uint8 image, caption); batches (uint8 (B, 3, S, S), captions, bool (B,) valid).

    A `txt` member may hold several captions, one per line; `caption` picks one per sample and epoch:
    "random" (seeded by seed, epoch, rank, worker), "first", or "cycle" (caption number epoch % count, so
    successive epochs walk through all captions). `tokenizer`, when given, maps the list of captions to an
    int64 (B, L) tensor inside the worker.
    """

    def __init__(
        self,
        *args,
        caption: str = "random",
        tokenizer: Optional[Callable[[list[str]], torch.Tensor]] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if caption not in CAPTION_CHOICES:
            raise ValueError(f"caption must be one of {CAPTION_CHOICES}, got {caption!r}")
        self.caption, self.tokenizer = caption, tokenizer

    def check(self, sample: dict) -> Optional[str]:
        return _missing(sample, ("txt",))

    def decode(self, sample: dict, rng: random.Random, epoch: int, train: bool):
        captions = caption_lines(sample["txt"])
        if not captions:
            raise ValueError("empty caption")
        if self.caption == "first" or len(captions) == 1:
            text = captions[0]
        elif self.caption == "cycle":
            text = captions[epoch % len(captions)]
        else:
            text = captions[rng.randrange(len(captions))]
        return self.image(sample, rng, train), text, True

    def pad(self):
        return self.blank(), "", False

    def collate(self, items: list):
        images = _stack_images([im for im, _, _ in items])  # (B, 3, S, S) uint8
        texts = [t for _, t, _ in items]
        valid = torch.tensor([v for _, _, v in items], dtype=torch.bool)  # (B,)
        return images, (self.tokenizer(texts) if self.tokenizer is not None else texts), valid
