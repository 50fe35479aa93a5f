"""Shard writers: exact round trips, determinism, image-folder and caption conversions, size files."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from data_pipelines.metadata import read_classes, read_sizes, shard_sizes, write_sizes
from data_pipelines.shards import iter_shard
from data_pipelines.synthetic import CLASS_NAMES
from data_pipelines.urls import expand_urls
from data_pipelines.writers import ShardSink, write_image_folder, write_synthetic
from data_pipelines.writers_csv import write_caption_corpus
from tests.conftest import shared_data

from .conftest import jpeg


def _read_all(pattern: str) -> list[dict]:
    return [s for url in expand_urls(pattern) for _, s, problem in iter_shard(url) if problem is None]


def test_shard_sink_round_trip_is_exact(tmp_path):
    samples = [{"__key__": f"k{i:04d}", "jpg": jpeg(i), "cls": str(i % 7).encode()} for i in range(23)]
    with ShardSink(tmp_path, "train", shard_size=10) as sink:
        for s in samples:
            sink.write(s)
    assert sink.sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 3}
    write_sizes(tmp_path, sink.sizes)
    urls = expand_urls(str(tmp_path / "train-{000000..000002}.tar"))
    assert shard_sizes(urls) == [10, 10, 3] and read_sizes(urls) == 23
    back = _read_all(str(tmp_path / "train-{000000..000002}.tar"))
    assert [b["__key__"] for b in back] == [s["__key__"] for s in samples]
    assert all(b["jpg"] == s["jpg"] and b["cls"] == s["cls"] for b, s in zip(back, samples))


def test_sizes_merge_and_missing(tmp_path):
    write_sizes(tmp_path, {"train-000000.tar": 5})
    write_sizes(tmp_path, {"val-000000.tar": 2})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"train-000000.tar": 5, "val-000000.tar": 2}
    assert read_sizes([str(tmp_path / "train-000000.tar"), str(tmp_path / "train-000001.tar")]) is None
    assert read_sizes([str(tmp_path / "nothing" / "x.tar")]) is None


def test_synthetic_is_deterministic_and_has_every_class(tmp_path):
    a = write_synthetic(tmp_path / "a", num_train=120, num_val=30, image_size=16, seed=3, shard_size=50)
    write_synthetic(tmp_path / "b", num_train=120, num_val=30, image_size=16, seed=3, shard_size=50)
    write_synthetic(tmp_path / "c", num_train=120, num_val=30, image_size=16, seed=4, shard_size=50)
    assert a == {"train": f"{tmp_path}/a/train-{{000000..000002}}.tar", "val": f"{tmp_path}/a/val-000000.tar"}
    for name in ["train-000000.tar", "train-000002.tar", "val-000000.tar", "sizes.json", "classes.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (tmp_path / "c" / "train-000000.tar").read_bytes()
    train = _read_all(a["train"])
    labels = Counter(int(s["cls"]) for s in train)
    assert len(CLASS_NAMES) >= 10 and set(labels) == set(range(len(CLASS_NAMES)))
    assert max(labels.values()) - min(labels.values()) <= 1  # balanced
    assert Image.open(io.BytesIO(train[0]["jpg"])).size == (16, 16)
    assert read_classes(expand_urls(a["train"])) == CLASS_NAMES
    assert json.loads((tmp_path / "a" / "sizes.json").read_text()) == {
        "train-000000.tar": 50, "train-000001.tar": 50, "train-000002.tar": 20, "val-000000.tar": 30,
    }


def test_synthetic_refuses_to_overwrite(tmp_path):
    write_synthetic(tmp_path, num_train=10, num_val=0, image_size=16)
    with pytest.raises(FileExistsError, match="already has"):
        write_synthetic(tmp_path, num_train=10, num_val=0, image_size=16)


def _tree(root, splits=("train", "test"), classes=("dog", "cat", "bird"), per_class=4):
    files = {}
    for split in splits:
        for ci, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                data = jpeg(hash((split, cls, i)) % 1000)
                (root / split / cls / f"{i:03d}.jpg").write_bytes(data)
                files[(split, cls, f"{i:03d}")] = data
    return files


@pytest.mark.parametrize("as_tarball", [False, True])
def test_image_folder_to_shards(tmp_path, as_tarball):
    files = _tree(tmp_path / "src")
    src = tmp_path / "src"
    if as_tarball:
        src = tmp_path / "src.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(tmp_path / "src", arcname="cifar")  # a leading folder, as many archives have
    patterns = write_image_folder(src, tmp_path / "out", shard_size=5, rename_splits={"test": "val"})
    assert set(patterns) == {"train", "val"}
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == ["bird", "cat", "dog"]  # sorted
    for split, folder in (("train", "train"), ("val", "test")):
        samples = _read_all(patterns[split])
        assert len(samples) == 12 and read_sizes(expand_urls(patterns[split])) == 12
        for s in samples:
            cls, stem = s["__key__"].rsplit("_", 1)
            assert classes[int(s["cls"])] == cls
            assert s["jpg"] == files[(folder, cls, stem)]  # bytes copied, not re-encoded
        first_shard = [s["__key__"].split("_")[0] for s in samples[:5]]
        assert len(set(first_shard)) > 1  # shuffled: shards mix classes


def test_image_folder_limit_and_errors(tmp_path):
    _tree(tmp_path / "src", splits=("train",))
    patterns = write_image_folder(tmp_path / "src", tmp_path / "out", limit=5)
    assert len(_read_all(patterns["train"])) == 5
    with pytest.raises(FileNotFoundError):
        write_image_folder(tmp_path / "nope", tmp_path / "out2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        write_image_folder(tmp_path / "empty", tmp_path / "out3")


def test_cifar10_tarball_subset(tmp_path):
    src = shared_data("cifar10") / "cifar10-jpg.tar.gz"
    patterns = write_image_folder(src, tmp_path, shard_size=40, limit=100, rename_splits={"test": "val"})
    assert set(patterns) == {"train", "val"}
    assert json.loads((tmp_path / "classes.json").read_text())[:2] == ["airplane", "automobile"]
    samples = _read_all(patterns["train"])
    assert len(samples) == 100 and len({int(s["cls"]) for s in samples}) == 10
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (32, 32)
    assert json.loads((tmp_path / "sizes.json").read_text())["train-000002.tar"] == 20


def test_caption_corpus_groups_captions_per_image(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        (images / f"im{i}.jpg").write_bytes(jpeg(i))
    rows = ["image,caption"] + [f"im{i}.jpg,caption {j} of image {i}" for i in range(10) for j in range(3)]
    rows.append("missing.jpg,nobody has this")
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    patterns = write_caption_corpus(tmp_path / "caps.csv", images, tmp_path / "out", val_fraction=0.2,
                                    image_col="image", caption_col="caption", shard_size=4)
    train, val = _read_all(patterns["train"]), _read_all(patterns["val"])
    assert len(train) == 8 and len(val) == 2
    for s in train + val:
        i = int(s["__key__"][2:])
        assert s["jpg"] == jpeg(i)
        assert s["txt"].decode().splitlines() == [f"caption {j} of image {i}" for j in range(3)]
        assert json.loads(s["json"])["image"] == f"im{i}.jpg"


def test_img2dataset_stats_files_give_sizes(tmp_path):
    from .conftest import write_tar

    for shard, n in (("00000", 3), ("00001", 2)):
        write_tar(tmp_path / f"{shard}.tar", [{"__key__": f"{shard}{i:04d}", "jpg": jpeg(i), "txt": b"a cat"} for i in range(n)])
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps({"count": 4, "successes": n, "failed_to_download": 1}))
    assert shard_sizes(expand_urls(str(tmp_path / "{00000..00001}.tar"))) == [3, 2]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "7", True])
def test_size_file_with_a_count_that_is_not_positive_is_refused(tmp_path, bad):
    """Issue 14, finding 13: a shard listed with 0 or a negative count was given no samples by the planner and so
    was silently never read."""
    from .conftest import make_shards

    pattern = make_shards(tmp_path, [4, 4])
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 4, "train-000001.tar": bad}))
    with pytest.raises(ValueError, match=rf"sizes.json lists {bad!r} samples for train-000001.tar.*positive"):
        shard_sizes(expand_urls(pattern))
    with pytest.raises(ValueError, match="positive integers"):
        write_sizes(tmp_path / "other", {"x.tar": bad})


def test_caption_corpus_keeps_images_with_the_same_basename_apart(tmp_path):
    """Issue 14, finding 9: a/1.jpg, b/1.jpg and b/1.png all became key '1', merged into one sample with
    duplicate members, and all three were lost."""
    images = tmp_path / "images"
    for sub in ("a", "b"):
        (images / sub).mkdir(parents=True)
    files = {"a/1.jpg": jpeg(1), "b/1.jpg": jpeg(2), "b/1.png": jpeg(3), "a_1.jpg": jpeg(4)}
    for name, data in files.items():
        (images / name).write_bytes(data)
    (tmp_path / "caps.tsv").write_text("".join(f"{name}\tphoto {name}\n" for name in files))
    patterns = write_caption_corpus(tmp_path / "caps.tsv", images, tmp_path / "out", val_fraction=0.0)
    samples = [s for url in expand_urls(patterns["train"]) for _, s, problem in iter_shard(url) if problem is None]
    assert len(samples) == 4 and len({s["__key__"] for s in samples}) == 4
    by_name = {json.loads(s["json"])["image"]: s for s in samples}
    for name, data in files.items():
        sample = by_name[name]
        assert sample.get("jpg", sample.get("png")) == data and sample["txt"].decode() == f"photo {name}"


def test_image_folder_skips_apple_double_files_and_links_out_of_the_tree(tmp_path):
    """Issue 14, finding 9: macOS `._*.jpg` resource forks and symlinks pointing outside the tree were packed."""
    _tree(tmp_path / "src", splits=("train",), classes=("cat",), per_class=2)
    cat = tmp_path / "src" / "train" / "cat"
    (cat / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "secret.jpg").write_bytes(jpeg(9))
    (cat / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (cat / "inside.jpg").symlink_to(cat / "000.jpg")  # a link within the tree is an ordinary file of it
    (tmp_path / "src" / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "__MACOSX" / "cat" / "._001.jpg").write_bytes(b"junk")
    patterns = write_image_folder(tmp_path / "src", tmp_path / "out")
    keys = sorted(s["__key__"] for s in _read_all(patterns["train"]))
    assert keys == ["cat_000", "cat_001", "cat_inside"]
    with tarfile.open(tmp_path / "src.tar", "w") as tar:  # the same rules for a tarball
        tar.add(tmp_path / "src", arcname="src")
    patterns = write_image_folder(tmp_path / "src.tar", tmp_path / "out2")
    assert sorted(s["__key__"] for s in _read_all(patterns["train"])) == ["cat_000", "cat_001"]
