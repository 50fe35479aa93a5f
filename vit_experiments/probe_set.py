"""The representation set of `vitx analyze`: a few hundred images, with their labels when the source has them,
for minibatch CKA between layers (and against a `--compare` checkpoint) and for the per-layer linear probes.

Sources, as `--images` names them (the same as for the attention probe images):
  - WebDataset shards (a folder of them, val-*.tar preferred, or a pattern): the first `num` samples; the labels
    are the samples' `cls` members when every sample has one (classification shards), else there are none;
  - a folder of images: when the images sit in class sub-folders (<class>/<image>, two or more classes, as
    `vitx data` image folders are), the label is the sub-folder's index among the sorted class names and the
    images are taken round-robin over the classes (the first of each class, then the second, ...), so that a
    probe sees every class even when `num` is below the folder's size; otherwise the first `num` files by path,
    without labels;
  - one image file: no representation set worth the name (CKA needs 4 images), so none.
The raw bytes are read once and decoded per model (resize + centre crop like the evaluation pipeline), so a
compared checkpoint at another image size sees the same images in the same order.
"""
from __future__ import annotations

import glob
import os
import sys
from collections import defaultdict
from typing import Optional

import torch

from vit_experiments.image_files import IMAGE_EXTENSIONS, image_files


class ProbeSet:
    """Raw images (name, bytes) and their labels (None without); decode() prepares them for one model."""

    def __init__(self, items: list[tuple[str, bytes]], labels: Optional[list[int]], class_names: Optional[list[str]]):
        self.items, self.labels, self.class_names = items, labels, class_names

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, size: int, crop_pct: float = 0.875, in_chans: int = 3) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> (uint8 (n, C, size, size), labels (n,) or None); undecodable images are skipped with a message."""
        from data_pipelines.transforms import decode_eval

        arrays, labels = [], []
        for i, (name, data) in enumerate(self.items):
            try:
                arrays.append(torch.from_numpy(decode_eval(data, size, crop_pct).copy()))
            except Exception as err:
                print(f"vitx analyze: skipping {name}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            if self.labels is not None:
                labels.append(self.labels[i])
        if not arrays:
            raise ValueError("none of the representation-set images could be decoded")
        images = torch.stack(arrays).permute(0, 3, 1, 2).contiguous()  # (n, 3, size, size)
        if in_chans == 1:
            images = images.float().mean(1, keepdim=True).round().to(torch.uint8)  # (n, 1, size, size)
        return images, (torch.tensor(labels, dtype=torch.long) if self.labels is not None else None)


def _from_folder(directory: str, num: int) -> ProbeSet:
    files = image_files(directory)
    by_class: dict[str, list[str]] = defaultdict(list)
    for f in files:
        parts = os.path.relpath(f, directory).split(os.sep)
        by_class[parts[0] if len(parts) > 1 else ""].append(f)
    if "" in by_class or len(by_class) < 2:  # loose files, or one class: no labels
        chosen, labels, names = files[:num], None, None
    else:
        names = sorted(by_class)
        chosen, labels = [], []
        for rank in range(max(len(v) for v in by_class.values())):  # round-robin over the classes
            for c, cls in enumerate(names):
                if rank < len(by_class[cls]) and len(chosen) < num:
                    chosen.append(by_class[cls][rank])
                    labels.append(c)
    items = []
    for f in chosen:
        with open(f, "rb") as fh:
            items.append((os.path.relpath(f, directory), fh.read()))
    return ProbeSet(items, labels, names)


def _from_shards(shards: list[str], num: int) -> ProbeSet:
    from data_pipelines.metadata import read_classes
    from data_pipelines.shards import iter_shard
    from data_pipelines.transforms import image_bytes

    items, labels, all_labelled = [], [], True
    for url in shards:
        for _, sample, problem in iter_shard(url):
            if len(items) >= num:
                break
            if problem is not None:
                continue
            try:
                data = image_bytes(sample)
            except KeyError:
                continue  # a sample without an image
            items.append((sample["__key__"], data))
            try:
                labels.append(int(sample["cls"].decode("ascii").strip()))
            except (KeyError, ValueError, AttributeError):
                all_labelled = False
        if len(items) >= num:
            break
    names = read_classes(shards) if all_labelled else None
    return ProbeSet(items, labels if all_labelled and labels else None, names)


def load_probe_set(spec: str, num: int) -> Optional[ProbeSet]:
    """The representation set of `spec` (see the module docstring), or None for a single image file."""
    from data_pipelines.urls import expand_urls

    if num < 1:
        return None
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "val-*.tar"))) or sorted(glob.glob(os.path.join(spec, "*.tar")))
        found = _from_shards(shards, num) if shards else _from_folder(spec, num)
    elif os.path.isfile(spec) and spec.lower().endswith(IMAGE_EXTENSIONS):
        return None
    else:
        found = _from_shards(expand_urls(spec), num)
    if len(found) == 0:
        raise FileNotFoundError(f"no images found in {spec}")
    return found
