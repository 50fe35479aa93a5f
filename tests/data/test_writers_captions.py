"""The captioned shapes corpus: image-text shards whose captions say what the image shows."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synthetic import CLASS_NAMES
from data_pipelines.writers_captions import COLOURS, CaptionedShapeRenderer, captions_for, write_synthetic_captions


def read_samples(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.rsplit(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_shards_carry_image_captions_label_and_attributes(tmp_path):
    patterns = write_synthetic_captions(tmp_path, num_train=20, num_val=10, image_size=16, shard_size=10)
    assert patterns["train"].endswith("train-{000000..000001}.tar")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"train-000000.tar": 10, "train-000001.tar": 10,
                                                                  "val-000000.tar": 10}
    assert json.loads((tmp_path / "classes.json").read_text()) == CLASS_NAMES
    for sample in read_samples(tmp_path / "val-000000.tar").values():
        assert set(sample) == {"jpg", "txt", "cls", "json"}
        assert Image.open(io.BytesIO(sample["jpg"])).size == (16, 16)
        attrs = json.loads(sample["json"])
        captions = sample["txt"].decode().splitlines()
        assert len(captions) == 3 and captions == attrs["captions"]
        assert CLASS_NAMES[int(sample["cls"])] == attrs["shape"]
        shape = attrs["shape"].replace("_", " ")
        assert all(shape in c for c in captions)  # every caption names the shape: zero-shot needs only that


def test_same_seed_same_bytes(tmp_path):
    write_synthetic_captions(tmp_path / "a", num_train=8, num_val=0, image_size=16)
    write_synthetic_captions(tmp_path / "b", num_train=8, num_val=0, image_size=16)
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()


def test_captions_describe_colour_and_place():
    """For shapes symmetric about their centre, the pixels of the named colour sit in the named third."""
    renderer, rng = CaptionedShapeRenderer(48, seed=0), random.Random(0)
    symmetric = [CLASS_NAMES.index(n) for n in ("circle", "square", "diamond", "star", "cross")]
    agree = 0
    for i in range(40):
        img, attrs = renderer.render_with_attributes(symmetric[i % len(symmetric)], rng)
        pixels = np.asarray(img, dtype=np.float32)  # (H, W, 3)
        mask = np.abs(pixels - np.array(COLOURS[attrs["colour"]], dtype=np.float32)).sum(-1) < 60  # (H, W)
        ys, xs = np.nonzero(mask)
        row = ("top", "middle", "bottom")[min(int(ys.mean() * 3 / 48), 2)]
        col = ("left", "centre", "right")[min(int(xs.mean() * 3 / 48), 2)]
        agree += (row, col) == (attrs["row"], attrs["col"])
        words = " ".join(captions_for(attrs, rng, count=8))
        assert attrs["colour"] in words and attrs["size"] in words
    assert agree >= 34  # a few shapes sit on a border between thirds (chance: 1 in 9)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="captions_per_image"):
        write_synthetic_captions(tmp_path, num_train=1, num_val=0, captions_per_image=0)
