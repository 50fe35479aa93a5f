"""A CSV/TSV of (image, caption) rows and a folder or tar of images -> image-text shards (`vitx data from-csv`).

    OUT/train-000000.tar ...  "<key>.jpg" (or .png/.webp) + "<key>.txt" (every caption, one per line)
                              + "<key>.json" ({"image": name, "captions": [...]}), as img2dataset writes them
    OUT/sizes.json
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

from .metadata import write_sizes
from .writers import IMAGE_EXTENSIONS, _files_in_tree, _junk, _unique_key, _write_split, pattern_for

log = logging.getLogger("data_pipelines.writers")


def _read_caption_table(
    path: Path, image_col: str | int, caption_col: str | int, delimiter: Optional[str]
) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in text.split("\n", 1)[0] else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if r]
    if not rows:
        raise ValueError(f"{path} has no rows")
    header = rows[0]
    looks_like_header = not any(Path(c.strip()).suffix.lower() in IMAGE_EXTENSIONS for c in header)

    def column(spec: str | int) -> int:
        if isinstance(spec, int) or str(spec).isdigit():
            return int(spec)
        if not looks_like_header or spec not in header:
            raise ValueError(f"{path}: column {spec!r} not in header {header}; give a column index instead")
        return header.index(spec)

    ic, cc = column(image_col), column(caption_col)
    body = rows[1:] if looks_like_header else rows
    pairs = []
    for lineno, row in enumerate(body, start=2 if looks_like_header else 1):
        if len(row) <= max(ic, cc):
            raise ValueError(f"{path}:{lineno}: expected at least {max(ic, cc) + 1} columns, got {row}")
        pairs.append((row[ic].strip(), row[cc].strip()))
    return pairs


_AMBIGUOUS = object()  # a bare file name that several images of the source share


def _image_source(images: Path) -> dict[str, object]:
    """{relative path, and bare file name where it is unique: Path or bytes} for a directory or a tar of
    images, without macOS litter or links out of the tree (see `_files_in_tree`)."""
    table: dict[str, object] = {}
    by_name: dict[str, object] = {}

    def add(name: str, payload: object) -> None:
        table[name] = payload
        base = os.path.basename(name)
        by_name[base] = _AMBIGUOUS if base in by_name else payload

    if images.is_dir():
        for p in _files_in_tree(images):
            add(str(p.relative_to(images)), p)
    elif tarfile.is_tarfile(images):
        with tarfile.open(images, mode="r|*") as tar:
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if m.isreg() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS and not _junk(parts):
                    add("/".join(parts), tar.extractfile(m).read())
    else:
        raise ValueError(f"{images} is neither a directory nor a tar archive of images")
    for base, payload in by_name.items():
        table.setdefault(base, payload)  # a full relative path wins over a bare name
    return table


def write_caption_corpus(
    captions: str | os.PathLike,
    images: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_col: str | int = 0,
    caption_col: str | int = 1,
    delimiter: Optional[str] = None,
    limit: Optional[int] = None,
) -> dict[str, str]:
    """Turn a CSV/TSV of (image, caption) rows into image-text shards (`jpg` + `txt` + `json`).

    All captions of one image go into one sample: `txt` holds them one per line (a single-caption corpus
    looks exactly like what img2dataset writes) and `json` holds {"image": name, "captions": [...]}; the
    reader picks one caption per epoch. Images are split into train/val by a seeded shuffle
    (`val_fraction` of the images go to val). `images` is a directory or a tar of image files. Rows whose
    image is missing are reported and skipped. A sample's key is the image's name as the table gives it,
    without its extension (`b/1.png` -> `b_1`), made unique, so images sharing a file name stay apart; a bare
    name that matches several files of `images` is reported and skipped. Returns {split: brace pattern}.
    """
    cap_path, img_path, out = Path(captions), Path(images), Path(out_dir)
    for p in (cap_path, img_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    grouped: dict[str, list[str]] = defaultdict(list)
    for name, caption in _read_caption_table(cap_path, image_col, caption_col, delimiter):
        if caption:
            grouped[name].append(caption.replace("\n", " "))
    source = _image_source(img_path)
    found = {n: source.get(n, source.get(os.path.basename(n))) for n in grouped}
    missing = [n for n, payload in found.items() if payload is None]
    ambiguous = [n for n, payload in found.items() if payload is _AMBIGUOUS]
    if missing:
        log.warning("%d images named in %s are not in %s (first: %s); skipping them", len(missing), cap_path, img_path, missing[0])
    if ambiguous:
        log.warning("%d image names in %s match several files of %s (first: %s); name them by their path in it; "
                    "skipping them", len(ambiguous), cap_path, img_path, ambiguous[0])
    names = sorted(n for n, payload in found.items() if payload is not None and payload is not _AMBIGUOUS)
    if not names:
        raise ValueError(f"none of the images named in {cap_path} were found in {img_path}")
    used: set[str] = set()  # keys from the name's path without its extension, unique over both splits
    keys = {n: _unique_key(os.path.splitext(n.lstrip("./"))[0], used) for n in names}
    random.Random(f"vitx-captions:{seed}").shuffle(names)
    if limit is not None:
        names = names[:limit]
    num_val = int(round(len(names) * val_fraction))
    splits = {"train": names[num_val:], "val": names[:num_val]}

    out.mkdir(parents=True, exist_ok=True)
    patterns = {}
    for split, members in splits.items():
        if not members:
            continue

        def samples(members=members) -> Iterator[dict]:
            for name in members:
                payload = found[name]
                data = payload.read_bytes() if isinstance(payload, Path) else payload
                ext = os.path.splitext(name)[1]
                caps = grouped[name]
                yield {
                    "__key__": keys[name],
                    IMAGE_EXTENSIONS.get(ext.lower(), "jpg"): data,
                    "txt": "\n".join(caps).encode("utf-8"),
                    "json": json.dumps({"image": name, "captions": caps}).encode("utf-8"),
                }

        sizes = _write_split(out, split, samples(), shard_size)
        write_sizes(out, sizes)
        patterns[split] = pattern_for(out, split, len(sizes))
    return patterns
