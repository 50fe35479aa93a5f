"""Write WebDataset shards: a synthetic shapes corpus, an image-folder tree (a CSV/TSV of (image, caption):
`writers_csv.py`), and the shard sink they all write through.

Layout of a shard directory (the one every reader in `data_pipelines` expects)::

    OUT/train-000000.tar ...   samples: "<key>.jpg" (or .png/.webp) + "<key>.cls" (ascii integer)
    OUT/val-000000.tar ...              or "<key>.jpg" + "<key>.txt" (+ "<key>.json") for image-text
    OUT/sizes.json             {"train-000000.tar": 1000, ...}  samples per shard, for every shard in OUT
    OUT/classes.json           ["circle", "square", ...]         label names, index = label (classification)

The size and class files are described (and read and written) in `metadata.py`. Image bytes are copied as
they are, never re-encoded. Tar members get a fixed mtime and owner so the same input gives byte-identical
shards.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import webdataset as wds

from .metadata import write_classes, write_sizes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


# ----------------------------------------------------------------------------------------------------------
# the shard sink shared by all writers


class ShardSink:
    """Write samples into `OUT/<split>-%06d.tar`, at most `shard_size` per shard, and record their counts.

    webdataset's ShardWriter opens its first shard eagerly (an empty split would leave an empty tar) and
    names shards by a printf pattern only; this thin loop around `wds.TarWriter` also returns the counts
    that go into sizes.json.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, shard_size: int = 1000):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", split):
            raise ValueError(f"split name {split!r} must be letters, digits, '_' or '-'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split, self.shard_size = split, shard_size
        self.sizes: dict[str, int] = {}
        self._writer: Optional[wds.TarWriter] = None
        self._name = ""
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._count >= self.shard_size:
            self._close_current()
            self._name = f"{self.split}-{len(self.sizes):06d}.tar"
            # fixed mtime/owner -> the same samples give byte-identical shards; an int mtime also keeps
            # tarfile from adding a pax header to every member (it does for float mtimes), halving parse time
            self._writer = wds.TarWriter(str(self.out_dir / self._name), encoder=False, mtime=0, user="vitx", group="vitx")
            self.sizes[self._name] = 0
            self._count = 0
        self._writer.write(sample)
        self._count += 1
        self.sizes[self._name] = self._count

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict[str, int]:
        self._close_current()
        return self.sizes

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _refuse_existing(out_dir: Path, split: str) -> None:
    old = sorted(out_dir.glob(f"{split}-*.tar"))
    if old:
        raise FileExistsError(
            f"{out_dir} already has {len(old)} '{split}' shards ({old[0].name} ...); "
            "write into an empty directory or delete them first"
        )


def _write_split(out_dir: Path, split: str, samples: Iterable[dict], shard_size: int) -> dict[str, int]:
    _refuse_existing(out_dir, split)
    with ShardSink(out_dir, split, shard_size) as sink:
        for sample in samples:
            sink.write(sample)
    return sink.sizes


def _cls_bytes(label: int) -> bytes:
    return str(int(label)).encode("ascii")


def _safe_key(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text)


def _unique_key(text: str, used: set[str]) -> str:
    """A sample key made of `text` (letters, digits, '_', '-'), not yet in `used` (then added to it): two
    different images must never share a key, or the reader merges them into one broken sample."""
    key = _safe_key(text)
    while key in used:  # e.g. cat/001.jpg and cat/001.png
        key += "_"
    used.add(key)
    return key


def _junk(parts: Sequence[str]) -> bool:
    """macOS litter that looks like images: AppleDouble `._name.jpg` files and `__MACOSX/` folders."""
    return any(p.startswith("._") or p == "__MACOSX" for p in parts)


def _files_in_tree(root: Path) -> Iterator[Path]:
    """The image files under `root`, sorted, without macOS litter and without symlinks that point outside
    the tree (a link to /etc/... or to another corpus is no part of this one)."""
    top = root.resolve()
    outside = 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or _junk(path.relative_to(root).parts) or not path.is_file():
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(top):
            outside += 1
            continue
        yield path
    if outside:
        log.warning("skipped %d symlink(s) under %s that point outside it", outside, root)


def pattern_for(out_dir: str | os.PathLike, split: str, num_shards: int) -> str:
    """Brace pattern that lists the shards of one split, e.g. OUT/train-{000000..000019}.tar."""
    if num_shards == 1:
        return f"{out_dir}/{split}-000000.tar"
    return f"{out_dir}/{split}-{{000000..{num_shards - 1:06d}}}.tar"


# ----------------------------------------------------------------------------------------------------------
# synthetic shapes


def write_synthetic(
    out_dir: str | os.PathLike,
    num_train: int = 20000,
    num_val: int = 2000,
    image_size: int = 32,
    seed: int = 0,
    shard_size: int = 1000,
    quality: int = 90,
    val_shard_size: Optional[int] = None,
) -> dict[str, str]:
    """Write the seeded shapes corpus (see `synthetic.py`) as train/val shards + sizes.json + classes.json.

    `val_shard_size` defaults to `shard_size`. Returns {split: brace pattern of its shards}.
    """
    from .synthetic import CLASS_NAMES, synthetic_samples

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_classes(out, CLASS_NAMES)
    patterns = {}
    for split, num, size in (("train", num_train, shard_size), ("val", num_val, val_shard_size or shard_size)):
        if num <= 0:
            continue
        samples = (
            {"__key__": key, "jpg": data, "cls": _cls_bytes(label)}
            for key, data, label in synthetic_samples(num, split, image_size, seed, quality)
        )
        sizes = _write_split(out, split, samples, size)
        write_sizes(out, sizes)
        patterns[split] = pattern_for(out, split, len(sizes))
    return patterns


# ----------------------------------------------------------------------------------------------------------
# image folder (directory tree or tarball) -> shards


def _folder_entries(src: Path) -> list[tuple[str, str, str, Path]]:
    """(split, class, file name, path) for src/<split>/<class>/<image> or src/<class>/<image> (split 'train')."""
    entries = []
    for path in _files_in_tree(src):
        parts = path.relative_to(src).parts
        if len(parts) == 3:
            entries.append((parts[0], parts[1], parts[2], path))
        elif len(parts) == 2:
            entries.append(("train", parts[0], parts[1], path))
    return entries


def _tarball_entries(src: Path) -> list[tuple[str, str, str, bytes]]:
    """Same as `_folder_entries` for a .tar/.tar.gz, streamed once with the image bytes kept in memory."""
    entries = []
    with tarfile.open(src, mode="r|*") as tar:
        for member in tar:
            if not member.isreg() or Path(member.name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue  # links are not regular members: a tarball's symlinks are never followed
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if _junk(parts):
                continue
            if len(parts) >= 3:
                split, cls, name = parts[-3], parts[-2], parts[-1]
            elif len(parts) == 2:
                split, cls, name = "train", parts[0], parts[1]
            else:
                continue
            entries.append((split, cls, name, tar.extractfile(member).read()))
    return entries


def write_image_folder(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    seed: int = 0,
    limit: Optional[int] = None,
    rename_splits: Optional[dict[str, str]] = None,
) -> dict[str, str]:
    """Turn an image-folder tree into shards: `src/<split>/<class>/*.jpg` -> `OUT/<split>-XXXXXX.tar`.

    `src` may be a directory or a .tar/.tar.gz of that tree (streamed once, images held in memory, so
    extract very large archives first). A tree without split folders (`src/<class>/*.jpg`) becomes split
    'train'. Labels are indices into the sorted class names, the same for every split. Samples of a split
    are shuffled with `seed` before sharding so every shard mixes classes. `limit` keeps only the first
    `limit` samples of each split after the shuffle (a class-mixed subset). `rename_splits` maps folder
    names to split names, e.g. {"test": "val"}. macOS litter (`._*` files, `__MACOSX/`) and symlinks that
    point outside the tree are skipped. Returns {split: brace pattern of its shards}.
    """
    src_path, out = Path(src), Path(out_dir)
    if not src_path.exists():
        raise FileNotFoundError(f"image folder {src_path} does not exist")
    if src_path.is_dir():
        entries: list = _folder_entries(src_path)
    elif tarfile.is_tarfile(src_path):
        entries = _tarball_entries(src_path)
    else:
        raise ValueError(f"{src_path} is neither a directory nor a tar archive of <split>/<class>/<image> files")
    if not entries:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found as <split>/<class>/<image> in {src_path}")
    rename = rename_splits or {}
    classes = sorted({e[1] for e in entries})
    index = {c: i for i, c in enumerate(classes)}
    by_split: dict[str, list] = defaultdict(list)
    for entry in entries:
        by_split[rename.get(entry[0], entry[0])].append(entry)

    out.mkdir(parents=True, exist_ok=True)
    write_classes(out, classes)
    patterns = {}
    for split in sorted(by_split):
        items = by_split[split]
        random.Random(f"vitx-folder:{seed}:{split}").shuffle(items)
        if limit is not None:
            items = items[:limit]

        def samples(items=items) -> Iterator[dict]:
            used: set[str] = set()
            for _, cls, name, payload in items:
                stem, ext = os.path.splitext(name)
                data = payload.read_bytes() if isinstance(payload, Path) else payload
                yield {
                    "__key__": _unique_key(f"{cls}_{stem}", used),
                    IMAGE_EXTENSIONS[ext.lower()]: data,
                    "cls": _cls_bytes(index[cls]),
                }

        sizes = _write_split(out, split, samples(), shard_size)
        write_sizes(out, sizes)
        patterns[split] = pattern_for(out, split, len(sizes))
    return patterns
