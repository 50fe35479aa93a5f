"""Tiny shard sets for the data tests: a few hundred 8x8 JPEGs whose label is the sample's global index,
so coverage across simulated ranks and workers can be checked exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import webdataset as wds

from data_pipelines.metadata import write_sizes

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    """One shard with exactly these samples (members written in key order, as webdataset does)."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for sample in samples:
            w.write(sample)


def make_shards(
    out: Path, sizes: list[int], split: str = "train", image_size: int = 8, with_sizes: bool = True
) -> str:
    """Shards with the given sample counts; sample i (global) has label i. Returns a brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    img = jpeg(0, image_size)  # one encoded image shared by all samples keeps this fast
    index, table = 0, {}
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        write_tar(out / name, [{"__key__": f"s{index + i:06d}", "jpg": img, "cls": str(index + i).encode()} for i in range(n)])
        table[name] = n
        index += n
    if with_sizes:
        write_sizes(out, table)
    last = len(sizes) - 1
    return str(out / (f"{split}-{{000000..{last:06d}}}.tar" if last else f"{split}-000000.tar"))


@pytest.fixture
def shards(tmp_path):
    """Factory fixture: shards(sizes, split=..., ...) -> pattern in a fresh directory."""

    def make(sizes, split="train", sub="shards", **kw):
        return make_shards(tmp_path / sub, list(sizes), split=split, **kw)

    return make
