"""The synthetic demo corpus that `synthesize_if_missing` writes: only ever at its own place, data/shapes/.

The shipped demo configs (conf/vit/pretrain.yaml, ...) read `data/shapes/train-{000000..000019}.tar` and turn
`synthesize_if_missing` on, so `make pretrain` runs on a fresh clone without any download. Anything else
that matches nothing — a typo, a real corpus not made yet — is an error naming the pattern, never a synthetic
corpus written at that path and trained on as if it were the data.
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Optional

from .urls import HOW_TO_MAKE_SHARDS, expand_urls, pattern_count
from .writers import write_synthetic

log = logging.getLogger("data_pipelines.datamodules")

# the one place synthesize_if_missing writes to (relative to where vitx runs), as the shipped demo configs name it
DEMO_DIR = "data/shapes"
_DEMO_NAME = re.compile(r"(?P<split>[a-z]+)-(000000|\{000000\.\.(?P<last>\d{6})\})\.tar")


def check_demo_pattern(split: str, pattern: Optional[str]) -> None:
    """FileNotFoundError naming `pattern` unless it names the demo corpus's own shards, data/shapes/<split>-..."""
    head, name = os.path.split(pattern or "")
    match = _DEMO_NAME.fullmatch(name)
    if os.path.abspath(head) == os.path.abspath(DEMO_DIR) and match and match["split"] == split:
        return
    raise FileNotFoundError(
        f"no shards match {split}_shards={pattern!r}, and synthesize_if_missing writes the synthetic demo corpus "
        f"only at its own place, {DEMO_DIR}/{split}-{{000000..N}}.tar: correct the pattern, make the shards "
        f"first ({HOW_TO_MAKE_SHARDS}), or turn synthesize_if_missing off"
    )


def _shard_size_for(pattern: Optional[str], num_samples: int) -> int:
    """Samples per shard so that a brace pattern's shard count is exactly what gets written
    (`train-{000000..000009}.tar` -> 10 shards); 1000 for patterns whose count cannot be read off."""
    count = pattern_count(pattern) if pattern else None
    return 1000 if count is None else max(1, math.ceil(num_samples / max(1, count)))


def write_demo_corpus(
    train_shards: str, val_shards: str, num_train: int, num_val: int, image_size: int, seed: int,
    shard_size: Optional[int] = None,
) -> None:
    """Write the demo corpus for these patterns (checked first: see `check_demo_pattern`), saying so."""
    for split, pattern in (("train", train_shards), ("val", val_shards)):
        check_demo_pattern(split, pattern)
    log.warning(
        "no shards match %r and synthesize_if_missing is on: writing the synthetic shapes demo corpus "
        "(%d train / %d val images, %d px) to its own place, %s/", train_shards, num_train, num_val, image_size,
        DEMO_DIR,
    )
    write_synthetic(
        DEMO_DIR, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
        shard_size=shard_size or _shard_size_for(train_shards, num_train),
        val_shard_size=shard_size or _shard_size_for(val_shards, num_val),
    )
    for pattern in (train_shards, val_shards):
        expand_urls(pattern)  # the corpus is there now (a synth_shard_size may have made other shards)
