"""The corpora `make gpu-check` trains and loads from, written at run time into its work folder (never into the
repository): the 32-px shapes corpus and its captioned twin with a tokenizer (what the shipped demo experiments
read), and real-photo JPEG shards for the end-to-end loading rate."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
# the development machines' photo set (/work/shared/data/README.md); absent on a user's machine and on the GPU one
PHOTO_SOURCES = (REPO.parent / "shared" / "data" / "imagenet-samples" / "images.tar",
                 Path("/work/shared/data/imagenet-samples/images.tar"))


def pattern(folder: Path, split: str) -> str:
    n = len(list(folder.glob(f"{split}-*.tar")))
    if not n:
        raise FileNotFoundError(f"no {split} shards in {folder}")
    return str(folder / (f"{split}-{{000000..{n - 1:06d}}}.tar" if n > 1 else f"{split}-000000.tar"))


def write_demo_corpora(work: Path, num_train: int, shards: int = 4) -> dict[str, Path]:
    """Shapes and captioned shapes at 32 px (the demo experiments' size), `num_train` training images each in
    `shards` shards, 16 validation images; the caption tokenizer as conf/clip/demo.yaml trains it."""
    from data_pipelines.tokenizer import train_tokenizer
    from data_pipelines.writers import write_synthetic
    from data_pipelines.writers_captions import write_synthetic_captions

    shapes, captions = work / "shapes", work / "captions"
    per_shard = math.ceil(num_train / shards)
    if not (shapes / "sizes.json").is_file():
        write_synthetic(shapes, num_train=num_train, num_val=16, image_size=32, seed=0, shard_size=per_shard)
    if not (captions / "tokenizer.json").is_file():
        patterns = write_synthetic_captions(captions, num_train=num_train, num_val=16, image_size=32, seed=0,
                                            shard_size=per_shard)
        train_tokenizer([patterns["train"]], captions / "tokenizer.json", vocab_size=1024, context_length=24)
    return {"shapes": shapes, "captions": captions}


def photo_source(given: Optional[str]) -> Optional[Path]:
    """A tar of JPEG photos: the one given, else the development machines' ImageNet samples, else None."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"--photos {given}: no such file (a .tar of JPEG images)")
        return path
    return next((p for p in PHOTO_SOURCES if p.is_file()), None)


def _photos(source: Path) -> list[bytes]:
    with tarfile.open(source) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))]


def _shapes_photos(n: int, size: int) -> list[bytes]:
    from data_pipelines.synthetic import synthetic_samples

    return [jpeg for _, jpeg, _ in synthetic_samples(n, "train", image_size=size, seed=0)]


def write_jpeg_shards(folder: Path, source: Optional[Path], num_samples: int, shards: int,
                      fallback_size: int = 256) -> str:
    """`num_samples` JPEG samples (the source's photos, repeated as often as needed, each with its own key and
    label = photo index mod 10) in `shards` shards, with sizes.json and classes.json. Without a photo source, the
    shapes corpus rendered at `fallback_size` px stands in. Returns a description of what was written."""
    from data_pipelines.metadata import write_classes, write_sizes
    from data_pipelines.writers import ShardSink

    photos = _photos(source) if source is not None else _shapes_photos(min(num_samples, 512), fallback_size)
    if not photos:
        raise ValueError(f"no JPEG images in {source}")
    per_shard = math.ceil(num_samples / shards)
    with ShardSink(folder, "train", per_shard) as sink:
        for i in range(num_samples):
            sink.write({"__key__": f"photo_{i:08d}", "jpg": photos[i % len(photos)], "cls": str(i % 10).encode()})
    write_sizes(folder, sink.sizes)
    write_classes(folder, [f"class_{k}" for k in range(10)])
    what = f"{source.name} ({len(photos)} photos)" if source is not None else f"shapes at {fallback_size} px"
    megabytes = sum(len(photos[i % len(photos)]) for i in range(num_samples)) / 2**20
    return f"{num_samples} JPEG samples from {what}, {megabytes:.0f} MiB in {len(sink.sizes)} shards"
