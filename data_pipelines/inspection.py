"""`vitx data inspect`: what a shard set holds, what is wrong with it, and its size file.

Reads every shard once with the same sample grouping as the streaming layer (so the counts it writes to
sizes.json are the ones the reader expects) and reports shards, samples, member keys, image sizes, the label
histogram or caption lengths, and every problem: unreadable or truncated shards, duplicate keys, samples
without an image, images that fail to decode (with `verify`, which decodes every image fully).
"""

from __future__ import annotations

import io
import os
from collections import Counter, defaultdict
from typing import Any, Optional

from PIL import Image

from .metadata import shard_sizes_table, write_sizes
from .shards import ShardReadError, iter_shard
from .samples import caption_lines
from .transforms import IMAGE_KEYS
from .urls import expand_urls


def inspect_shards(
    pattern: str,
    verify: bool = False,
    write_size_file: bool = False,
    allow_pipe: bool = False,
    max_problems: int = 50,
) -> dict[str, Any]:
    """Scan the shards of `pattern`; return a report dict (see `format_report`).

    With `write_size_file`, write (merge) sizes.json beside local shards, counting every sample the reader
    will see, well-formed or not, so that exact epoch planning lines up with the data. A shard that is
    truncated, unreadable or empty is a problem and its count is not written (the entry it has is kept):
    a size file must never shrink to what a damaged shard still holds.
    """
    urls = expand_urls(pattern, allow_pipe=allow_pipe)
    per_shard: dict[str, int] = {}
    keys: Counter = Counter()
    sizes: Counter = Counter()
    labels: Counter = Counter()
    caption_words: list[int] = []
    problems: list[str] = []
    num_problems = 0

    def problem(text: str) -> None:
        nonlocal num_problems
        num_problems += 1
        if len(problems) < max_problems:
            problems.append(text)

    broken: set[str] = set()
    listed: dict[str, Optional[dict]] = {}
    for url in urls:
        n = 0
        try:
            for _, sample, issue in iter_shard(url):
                n += 1
                members = sorted(k for k in sample if not k.startswith("__"))
                keys[",".join(members)] += 1
                where = f"{os.path.basename(url)}:{sample['__key__']}"
                if issue:
                    problem(f"{where}: {issue}")
                image_key = next((k for k in IMAGE_KEYS if k in sample), None)
                if image_key is None:
                    problem(f"{where}: no image member")
                else:
                    try:
                        img = Image.open(io.BytesIO(sample[image_key]))
                        sizes[img.size] += 1
                        if verify:
                            img.load()
                    except Exception as exn:
                        problem(f"{where}: image does not decode ({type(exn).__name__}: {exn})")
                if "cls" in sample:
                    try:
                        labels[int(sample["cls"].decode("ascii").strip())] += 1
                    except ValueError:
                        problem(f"{where}: cls is not an integer: {sample['cls'][:20]!r}")
                if "txt" in sample:
                    try:
                        caption_words += [len(line.split()) for line in caption_lines(sample["txt"])]
                    except UnicodeDecodeError as exn:
                        problem(f"{where}: txt is not UTF-8 ({exn})")
        except ShardReadError as exn:
            problem(f"{os.path.basename(url)}: unreadable after {n} samples: {exn}")
            broken.add(url)
        per_shard[url] = n
        if n == 0 and url not in broken:
            problem(f"{os.path.basename(url)}: no samples")
            broken.add(url)
        directory, name = os.path.split(url)
        if "://" not in url and directory not in listed:
            listed[directory] = shard_sizes_table(directory or ".")
        promised = (listed.get(directory) or {}).get(name)
        if promised is not None and promised != n:
            problem(f"{name}: sizes.json lists {promised} samples, the shard holds {n}")

    written = []
    if write_size_file:
        by_dir: dict[str, dict[str, int]] = defaultdict(dict)
        for url, n in per_shard.items():
            if "://" in url or url.startswith("pipe:"):
                raise ValueError(f"can only write sizes.json beside local shards, not for {url}")
            if url not in broken:
                by_dir[os.path.dirname(url) or "."][os.path.basename(url)] = n
        written = [str(write_sizes(d, table)) for d, table in by_dir.items() if table]

    report: dict[str, Any] = {
        "pattern": pattern,
        "shards": len(urls),
        "samples": sum(per_shard.values()),
        "samples_per_shard": per_shard,
        "member_keys": dict(keys.most_common()),
        "image_sizes": {f"{w}x{h}": c for (w, h), c in sizes.most_common(10)},
        "distinct_image_sizes": len(sizes),
        "problems": problems,
        "num_problems": num_problems,
        "size_files_written": written,
    }
    if labels:
        report["labels"] = dict(sorted(labels.items()))
    if caption_words:
        caption_words.sort()
        report["caption_words"] = {
            "captions": len(caption_words),
            "min": caption_words[0],
            "median": caption_words[len(caption_words) // 2],
            "max": caption_words[-1],
        }
    return report


def format_report(report: dict[str, Any], names: Optional[list[str]] = None) -> str:
    """Human-readable report."""
    counts = list(report["samples_per_shard"].values())
    lines = [
        f"pattern   {report['pattern']}",
        f"shards    {report['shards']}  (samples per shard: min {min(counts)}, max {max(counts)})",
        f"samples   {report['samples']}",
        "members   " + "; ".join(f"{k}: {v}" for k, v in report["member_keys"].items()),
        f"images    {report['distinct_image_sizes']} distinct sizes; most common: "
        + ", ".join(f"{k} ({v})" for k, v in report["image_sizes"].items()),
    ]
    if "labels" in report:
        hist = report["labels"]
        shown = ", ".join(f"{(names[k] if names and 0 <= k < len(names) else k)}: {v}" for k, v in list(hist.items())[:20])
        more = f" ... ({len(hist)} labels)" if len(hist) > 20 else f" ({len(hist)} labels)"
        lines.append(f"labels    {shown}{more}")
    if "caption_words" in report:
        c = report["caption_words"]
        lines.append(f"captions  {c['captions']}; words min {c['min']}, median {c['median']}, max {c['max']}")
    lines.append(f"problems  {report['num_problems']}")
    lines += [f"  - {p}" for p in report["problems"]]
    if report["num_problems"] > len(report["problems"]):
        lines.append(f"  ... and {report['num_problems'] - len(report['problems'])} more")
    for path in report["size_files_written"]:
        lines.append(f"wrote     {path}")
    return "\n".join(lines)
