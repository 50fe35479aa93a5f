"""A procedurally generated, labelled corpus of shapes: a demo data set that needs no download.

Every image shows one shape of one of ``len(SHAPES)`` classes on a varied background. Position, scale,
rotation, colour and background (flat colour, linear gradient, noise) vary from image to image, so a
classifier has to look at the whole picture rather than at a fixed patch or at the colour statistics.
Shapes whose identity depends on orientation (square vs diamond, horizontal vs vertical bar, cross) rotate
only a little; the others rotate freely. Images are drawn with Pillow at 2x and downsampled with a box
filter for anti-aliased edges. Generation is seeded: the same (seed, split, index) gives the same pixels.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

# class name -> maximum rotation in degrees; the order is the label order
SHAPES: dict[str, float] = {
    "circle": 180.0,
    "ring": 180.0,
    "square": 15.0,
    "diamond": 15.0,
    "triangle": 180.0,
    "star": 180.0,
    "cross": 15.0,
    "horizontal_bar": 15.0,
    "vertical_bar": 15.0,
    "half_disc": 180.0,
}
CLASS_NAMES: list[str] = list(SHAPES)

_SUPERSAMPLE = 2
_NOISE_TILE = 256  # side of the pre-drawn noise texture that backgrounds crop from


def _rotate(points: list[tuple[float, float]], degrees: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """Rotate unit-centred points by `degrees` and move them to (cx, cy)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _polygon(n: int, radius: float, inner: float | None = None, phase: float = -90.0) -> list[tuple[float, float]]:
    """Regular polygon (or star when `inner` is given) of circumradius `radius` around the origin."""
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        r = radius if inner is None or i % 2 == 0 else inner
        a = math.radians(phase + 360.0 * i / k)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _shape_outline(name: str, r: float) -> list[tuple[float, float]]:
    """Polygon outline of a shape of 'radius' r around the origin (before rotation)."""
    if name in ("circle", "ring"):
        return _polygon(48, r)
    if name == "square":
        h = r * 0.75
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if name == "diamond":
        return [(0, -r), (r, 0), (0, r), (-r, 0)]
    if name == "triangle":
        return _polygon(3, r)
    if name == "star":
        return _polygon(5, r, inner=r * 0.42)
    if name == "cross":
        t = r * 0.3
        return [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
    if name == "horizontal_bar":
        return [(-r, -r * 0.28), (r, -r * 0.28), (r, r * 0.28), (-r, r * 0.28)]
    if name == "vertical_bar":
        return [(-r * 0.28, -r), (r * 0.28, -r), (r * 0.28, r), (-r * 0.28, r)]
    if name == "half_disc":
        return [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) - r * 0.4) for a in range(0, 181, 6)]
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")


class ShapeRenderer:
    """Draws seeded shape images; one instance per corpus so the noise texture is made once."""

    def __init__(self, image_size: int = 32, seed: int = 0):
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is too small to draw shapes; use 8 or more")
        self.image_size = image_size
        self.canvas = image_size * _SUPERSAMPLE
        tile_rng = np.random.default_rng(seed)
        self.noise = tile_rng.integers(-40, 41, size=(_NOISE_TILE, _NOISE_TILE, 1), dtype=np.int16)  # (T, T, 1)
        self._ramp = np.linspace(0.0, 1.0, self.canvas, dtype=np.float32)

    def _background(self, rng: random.Random) -> Image.Image:
        n = self.canvas
        c0 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
        kind = rng.random()
        if kind < 0.4:  # flat colour
            return Image.new("RGB", (n, n), tuple(int(v) for v in c0))
        if kind < 0.75:  # linear gradient between two colours along a random direction
            c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            a = rng.uniform(0, 2 * math.pi)
            t = (np.cos(a) * self._ramp[None, :] + np.sin(a) * self._ramp[:, None]) * 0.5 + 0.5  # (n, n)
            img = c0 + (c1 - c0) * t[..., None]  # (n, n, 3)
            return Image.fromarray(img.astype(np.uint8), "RGB")
        # flat colour plus grey noise cropped from the shared texture at a random offset
        span = max(_NOISE_TILE - n, 0) + 1
        ox, oy = rng.randrange(span), rng.randrange(span)
        noise = np.resize(self.noise[oy:oy + n, ox:ox + n], (n, n, 1))  # (n, n, 1), tiled when n > tile
        img = np.clip(c0[None, None, :] + noise, 0, 255)  # (n, n, 3)
        return Image.fromarray(img.astype(np.uint8), "RGB")

    def render(self, label: int, rng: random.Random) -> Image.Image:
        """One image of class `label` at `image_size`, drawn from `rng`."""
        name = CLASS_NAMES[label]
        n = self.canvas
        img = self._background(rng)
        draw = ImageDraw.Draw(img)
        # foreground colour far from the background's mean so the shape is always visible
        bg_mean = np.asarray(img.resize((1, 1), Image.BOX), dtype=np.float32).reshape(3)
        for _ in range(20):
            fg = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
            if np.abs(fg - bg_mean).sum() > 200:
                break
        else:
            fg = 255.0 - bg_mean
        radius = rng.uniform(0.18, 0.38) * n
        cx = rng.uniform(radius, n - radius)
        cy = rng.uniform(radius, n - radius)
        angle = rng.uniform(-SHAPES[name], SHAPES[name])
        fill = tuple(int(v) for v in fg)
        draw.polygon(_rotate(_shape_outline(name, radius), angle, cx, cy), fill=fill)
        if name == "ring":  # the hole shows the background colour underneath
            hole = _rotate(_polygon(36, radius * 0.55), 0.0, cx, cy)
            draw.polygon(hole, fill=tuple(int(v) for v in bg_mean))
        return img.resize((self.image_size, self.image_size), Image.BOX)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes of an RGB image."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def synthetic_samples(num: int, split: str, image_size: int = 32, seed: int = 0, quality: int = 90):
    """Yield (key, jpeg bytes, label) for `num` images of one split; labels are balanced and shuffled."""
    rng = random.Random(f"vitx-shapes:{seed}:{split}")
    labels = [i % len(CLASS_NAMES) for i in range(num)]
    rng.shuffle(labels)
    renderer = ShapeRenderer(image_size, seed)
    for i, label in enumerate(labels):
        yield f"{split}_{i:08d}", encode_jpeg(renderer.render(label, rng), quality), label
