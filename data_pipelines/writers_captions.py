"""A captioned version of the synthetic shapes corpus: image-text shards for the CLIP demo.

Each image shows one shape (the 10 classes of `synthetic.py`) in one of 8 named colours, at one of 3 sizes, in
one of 9 places of a 3 x 3 grid, on the same varied backgrounds. Each sample carries several captions, one per
line of `txt`, that describe some or all of shape, colour, size and position in varied wording, so a model
trained on them learns each attribute as a word; and the class label `cls`, so the same shards double as a
classification set on which zero-shot accuracy can be measured. `json` holds the attributes.

    OUT/train-000000.tar ...  "<key>.jpg" + "<key>.txt" + "<key>.cls" + "<key>.json"
    OUT/sizes.json, OUT/classes.json

Generation is seeded: the same (seed, split, index) gives the same pixels and captions.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import CLASS_NAMES, SHAPES, ShapeRenderer, _polygon, _rotate, _shape_outline, encode_jpeg
from .metadata import write_classes, write_sizes
from .writers import _cls_bytes, _write_split, pattern_for

# named colours, far enough apart to be told apart at 32 px after JPEG
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# size word -> range of the shape's radius as a share of the image side
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "medium": (0.24, 0.29), "large": (0.31, 0.36)}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
PLACES = {  # (row, col) -> how a caption says it
    ("top", "left"): "in the top left corner", ("top", "centre"): "at the top",
    ("top", "right"): "in the top right corner",
    ("middle", "left"): "on the left", ("middle", "centre"): "in the centre", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left corner", ("bottom", "centre"): "at the bottom",
    ("bottom", "right"): "in the bottom right corner",
}
# caption wordings: some name every attribute, some only a few, some only the object (as human captions do).
# Every one names the shape; those that name nothing else make the image tower tell shapes apart, where colour,
# size and place would otherwise tell most pairs of a batch apart on their own.
TEMPLATES = (
    "a {size} {colour} {shape} {place}.",
    "a {colour} {shape} {place}.",
    "a {size} {shape} {place}.",
    "{place_cap}, a {size} {colour} {shape}.",
    "a picture of a {colour} {shape}.",
    "a {size} {colour} {shape}.",
    "there is a {colour} {shape} {place}.",
    "a {shape} that is {colour} and {size}, {place}.",
    "a {shape}.",
    "a picture of a {shape}.",
)


def shape_words(class_name: str) -> str:
    """'horizontal_bar' -> 'horizontal bar': class names as they appear in captions and prompts."""
    return class_name.replace("_", " ")


class CaptionedShapeRenderer(ShapeRenderer):
    """ShapeRenderer that chooses colour, size and place from named sets and reports them."""

    def render_with_attributes(self, label: int, rng: random.Random) -> tuple[Image.Image, dict]:
        name = CLASS_NAMES[label]
        n = self.canvas
        colour = rng.choice(list(COLOURS))
        fg = np.array(COLOURS[colour], dtype=np.float32)
        for _ in range(30):  # a background the shape stands out from
            img = self._background(rng)
            bg_mean = np.asarray(img.resize((1, 1), Image.BOX), dtype=np.float32).reshape(3)
            if np.abs(fg - bg_mean).sum() > 220:
                break
        else:
            img = Image.new("RGB", (n, n), (128, 128, 128) if colour in ("white", "black") else (250, 250, 250))
            bg_mean = np.asarray(img.getpixel((0, 0)), dtype=np.float32)
        size = rng.choice(list(SIZES))
        radius = rng.uniform(*SIZES[size]) * n

        def axis(names: tuple[str, str, str]) -> tuple[str, float]:
            # a third of the side that can hold the shape's centre (radius from the border), then a point in it
            cells = [(w, max(i * n / 3, radius), min((i + 1) * n / 3, n - radius)) for i, w in enumerate(names)]
            w, lo, hi = rng.choice([c for c in cells if c[2] - c[1] > 0.02 * n])
            return w, rng.uniform(lo, hi)

        row, cy = axis(ROWS)
        col, cx = axis(COLS)
        draw = ImageDraw.Draw(img)
        angle = rng.uniform(-SHAPES[name], SHAPES[name])
        draw.polygon(_rotate(_shape_outline(name, radius), angle, cx, cy), fill=tuple(int(v) for v in fg))
        if name == "ring":
            draw.polygon(_rotate(_polygon(36, radius * 0.55), 0.0, cx, cy), fill=tuple(int(v) for v in bg_mean))
        attrs = {"shape": name, "colour": colour, "size": size, "row": row, "col": col}
        return img.resize((self.image_size, self.image_size), Image.BOX), attrs


def captions_for(attrs: dict, rng: random.Random, count: int = 3) -> list[str]:
    """`count` distinct captions of one image, from different wordings."""
    place = PLACES[(attrs["row"], attrs["col"])]
    words = {"shape": shape_words(attrs["shape"]), "colour": attrs["colour"], "size": attrs["size"],
             "place": place, "place_cap": place[0].upper() + place[1:]}
    return [t.format(**words) for t in rng.sample(TEMPLATES, k=min(count, len(TEMPLATES)))]


def captioned_samples(
    num: int, split: str, image_size: int = 32, seed: int = 0, quality: int = 90, captions_per_image: int = 3
) -> Iterator[dict]:
    """Yield webdataset samples (jpg, txt, cls, json) for `num` images of one split; classes balanced."""
    rng = random.Random(f"vitx-shape-captions:{seed}:{split}")
    labels = [i % len(CLASS_NAMES) for i in range(num)]
    rng.shuffle(labels)
    renderer = CaptionedShapeRenderer(image_size, seed)
    for i, label in enumerate(labels):
        img, attrs = renderer.render_with_attributes(label, rng)
        caps = captions_for(attrs, rng, captions_per_image)
        yield {
            "__key__": f"{split}_{i:08d}",
            "jpg": encode_jpeg(img, quality),
            "txt": "\n".join(caps).encode("utf-8"),
            "cls": _cls_bytes(label),
            "json": json.dumps({**attrs, "captions": caps}).encode("utf-8"),
        }


def write_synthetic_captions(
    out_dir: str | os.PathLike,
    num_train: int = 20000,
    num_val: int = 1000,
    image_size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
    captions_per_image: int = 3,
) -> dict[str, str]:
    """Write the captioned shapes corpus as train/val shards + sizes.json + classes.json.

    Returns {split: brace pattern of its shards}.
    """
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_classes(out, CLASS_NAMES)
    patterns = {}
    for split, num in (("train", num_train), ("val", num_val)):
        if num <= 0:
            continue
        samples = captioned_samples(num, split, image_size, seed, captions_per_image=captions_per_image)
        sizes = _write_split(out, split, samples, shard_size)
        write_sizes(out, sizes)
        patterns[split] = pattern_for(out, split, len(sizes))
    return patterns


def main_synth_captions(argv=None) -> int:
    """`vitx data synth-captions OUT`: the captioned shapes corpus (CLIP demo)."""
    import argparse

    p = argparse.ArgumentParser(prog="vitx data synth-captions",
                                description="Write the captioned synthetic shapes corpus (image-text shards + cls).")
    p.add_argument("out", help="output directory")
    p.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--captions", type=int, default=3, help="captions per image (default 3)")
    args = p.parse_args(argv)
    try:
        patterns = write_synthetic_captions(args.out, args.train, args.val, args.image_size, args.seed,
                                            args.shard_size, args.captions)
    except (FileExistsError, ValueError) as exn:
        p.error(str(exn))
    for split, pattern in patterns.items():
        print(f"{split:6s} {pattern}")
    return 0
