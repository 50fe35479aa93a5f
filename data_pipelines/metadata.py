"""A shard set's metadata: its size file, its class file, and img2dataset's per-shard stats.

    OUT/sizes.json     {"train-000000.tar": 1000, ...}  samples per shard, for every shard in OUT
    OUT/classes.json   ["circle", "square", ...]         label names, index = label (classification)
    OUT/00000_stats.json ...                             img2dataset's; "successes" = samples in 00000.tar

The size file is open_clip's convention: one JSON object for every shard in the directory, so a reader can
compute an epoch's length, split samples exactly across ranks and workers, and pad validation, without
opening a shard. The writers (`writers.py`, `vitx data inspect --write-sizes`) write these files; the reader
(`streaming.py`) reads them. Neither imports the other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from .sources import is_local, local_path, open_url, scheme
from .urls import dir_and_name

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"


def _valid_count(value: object, allow_zero: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= (0 if allow_zero else 1)


def write_sizes(out_dir: str | os.PathLike, sizes: dict[str, int]) -> Path:
    """Merge {shard file name: sample count} into OUT/sizes.json (other shards' entries are kept).

    Counts must be positive integers: a shard listed with 0 samples would never be read, so an empty shard
    is left out of the size file (and should be left out of the pattern) rather than recorded."""
    bad = {k: v for k, v in sizes.items() if not _valid_count(v)}
    if bad:
        raise ValueError(f"sample counts must be positive integers; refusing to write {bad} to {out_dir}/{SIZES_FILE}")
    path = Path(out_dir) / SIZES_FILE
    merged: dict[str, int] = {}
    if path.exists():
        merged.update(json.loads(path.read_text()))
    merged.update({os.path.basename(k): int(v) for k, v in sizes.items()})
    path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
    return path


def _read_json_beside(directory: str, name: str) -> Optional[object]:
    """Load `directory/name` for a local directory or a remote URL prefix; None when it is not there."""
    if is_local(directory):
        path = Path(local_path(directory)) / name
        if not path.exists():
            return None
        return json.loads(path.read_text())
    if scheme(directory) == "pipe":
        return None
    try:  # http(s)://, s3://, gs://, ... (curl, aws, gsutil, ...)
        stream = open_url(f"{directory}/{name}")
        try:
            return json.loads(stream.read().decode("utf-8"))
        finally:
            stream.close()
    except Exception as exn:  # a missing size file is normal; say so and go on without it
        log.info("no %s at %s (%s)", name, directory, exn)
        return None


def shard_sizes_table(directory: str) -> Optional[dict[str, int]]:
    """{shard file name: samples} of the sizes.json in `directory` (local or remote), or None."""
    table = _read_json_beside(directory, SIZES_FILE)
    return table if isinstance(table, dict) else None


def img2dataset_sizes(directory: str) -> Optional[dict[str, int]]:
    """{shard: samples} from the `NNNNN_stats.json` files img2dataset writes beside local shards
    ("successes" is the number of samples it wrote into NNNNN.tar)."""
    if not is_local(directory):
        return None  # one request per shard would be too many; write a sizes.json for remote corpora
    table = {}
    for stats in Path(local_path(directory)).glob("*_stats.json"):
        try:
            table[stats.name[: -len("_stats.json")] + ".tar"] = int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            continue
    return table or None


def shard_sizes(urls: Sequence[str]) -> Optional[list[int]]:
    """Samples in each shard, from the sizes.json beside the shards (or, for local img2dataset output, its
    per-shard `_stats.json` files); None if any shard is not listed.

    A count in sizes.json that is not a positive integer is an error (ValueError naming the file and shard):
    the planner would give such a shard no samples, so it would silently never be read. (img2dataset's
    "successes": 0 is taken at its word: its writer left that tar empty.)"""
    by_dir: dict[str, tuple[Optional[dict], str, bool]] = {}
    out = []
    for url in urls:
        directory, name = dir_and_name(url)
        if directory not in by_dir:
            table, source, empty_ok = shard_sizes_table(directory), f"{directory}/{SIZES_FILE}", False
            if table is None:  # img2dataset writes a stats file for a shard all of whose downloads failed
                table, source, empty_ok = img2dataset_sizes(directory), f"{directory}/*_stats.json", True
            by_dir[directory] = (table, source, empty_ok)
        table, source, empty_ok = by_dir[directory]
        if table is None or name not in table:
            return None
        if not _valid_count(table[name], allow_zero=empty_ok):
            raise ValueError(
                f"{source} lists {table[name]!r} samples for {name}: counts must be positive integers (a shard "
                f"counted as empty would never be read). Recount with `vitx data inspect '{directory}/*.tar' "
                "--write-sizes`, or leave an empty shard out of the pattern"
            )
        out.append(table[name])
    return out


def read_sizes(urls: Sequence[str]) -> Optional[int]:
    """Total number of samples in the shards, or None when the size file is missing or incomplete."""
    sizes = shard_sizes(urls)
    return None if sizes is None else sum(sizes)


def write_classes(out_dir: str | os.PathLike, class_names: Sequence[str]) -> Path:
    """Write OUT/classes.json; refuse to silently change the label meaning of existing shards."""
    path = Path(out_dir) / CLASSES_FILE
    names = list(class_names)
    if path.exists():
        old = json.loads(path.read_text())
        if old != names:
            raise ValueError(
                f"{path} already lists different classes ({len(old)} vs {len(names)}); "
                "write the new shards to an empty directory"
            )
    path.write_text(json.dumps(names, indent=1) + "\n")
    return path


def read_classes(urls: Sequence[str]) -> Optional[list[str]]:
    """Class names from the classes.json beside the first shard, or None when absent."""
    if not urls:
        return None
    names = _read_json_beside(dir_and_name(urls[0])[0], CLASSES_FILE)
    return list(names) if isinstance(names, list) else None


def unlisted_shards(urls: Sequence[str]) -> Optional[str]:
    """What a list of local shards leaves out of its split, by the sizes.json beside them ("names 10 of the 20
    'train-*' shards listed in DIR/sizes.json; the rest are not read"), or None when it names them all."""
    local = [u for u in urls if is_local(u)]
    if not local or len(local) != len(urls):
        return None
    directory, first = os.path.split(local[0])
    prefix = first.rsplit("-", 1)[0] + "-"
    listed = shard_sizes_table(directory or ".")
    if listed is None:
        return None
    same_split = [k for k in listed if k.startswith(prefix)]
    named = [u for u in local if os.path.dirname(u) == directory]
    if len(same_split) <= len(named):
        return None
    return (f"names {len(named)} of the {len(same_split)} '{prefix}*' shards listed in {directory}/{SIZES_FILE}; "
            "the rest are not read")
