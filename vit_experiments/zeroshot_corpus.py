"""The corpus of `vitx zeroshot` (vit_experiments/zeroshot.py): a folder of class sub-directories, a folder of
WebDataset shards or a shard pattern, and the class names put into its prompts."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

from vit_experiments.image_files import IMAGE_EXTENSIONS, image_files

PROG = "vitx zeroshot"


class ZeroShotError(ValueError):
    """A problem with what the user asked for: reported as one line, exit status 2."""


# -- the corpus --------------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Where the images are and what they are labelled with; `samples()` streams them."""

    kind: str  # "folder" or "shards"
    source: str
    shards: list[str] = field(default_factory=list)
    folder_classes: list[str] = field(default_factory=list)  # sorted sub-directory names (kind "folder")
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, label), classes interleaved

    def samples(self, limit: Optional[int], skipped: Optional[list] = None
                ) -> Iterator[tuple[str, bytes, Optional[int], Optional[list[str]]]]:
        """(name, image bytes, label or None, captions or None), at most `limit` of them; malformed samples are
        reported and appended to `skipped`."""
        from data_pipelines.samples import caption_lines
        from data_pipelines.shards import iter_shard
        from data_pipelines.transforms import image_bytes

        n = 0
        if self.kind == "folder":
            for path, label in self.files[:limit]:
                with open(path, "rb") as fh:
                    yield os.path.relpath(path, self.source), fh.read(), label, None
            return
        for url in self.shards:
            for _, sample, problem in iter_shard(url):
                if limit is not None and n >= limit:
                    return
                if problem is not None:
                    print(f"{PROG}: skipping a sample of {url}: {problem}", file=sys.stderr)
                    if skipped is not None:
                        skipped.append(f"{url}: {problem}")
                    continue
                try:
                    data = image_bytes(sample)
                except KeyError:
                    continue  # a sample without an image
                label = int(sample["cls"].decode("ascii").strip()) if "cls" in sample else None
                captions = caption_lines(sample["txt"]) if "txt" in sample else None
                n += 1
                yield sample["__key__"], data, label, captions


def _class_folder(root: str) -> Corpus:
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    per_class = [(d, image_files(os.path.join(root, d))) for d in subdirs]
    per_class = [(d, files) for d, files in per_class if files]
    if not per_class:
        loose = image_files(root)
        what = (f"{len(loose)} images but no class sub-directories" if loose
                else f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar shards")
        raise ZeroShotError(f"{root} holds {what}: zero-shot classification needs FOLDER/<class>/*.jpg or shards "
                            "with `cls` labels")
    # interleave the classes (first image of every class, then the second, ...) so --num-images keeps them all
    longest = max(len(files) for _, files in per_class)
    files = [(files[i], label) for i in range(longest) for label, (_, files) in enumerate(per_class)
             if i < len(files)]
    return Corpus("folder", root, folder_classes=[d for d, _ in per_class], files=files)


def open_corpus(spec: str) -> Corpus:
    """A folder of class sub-directories, a folder of shards, or a shard pattern."""
    from data_pipelines.urls import expand_urls

    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "val-*.tar"))) or sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not shards:
            return _class_folder(spec)
        return Corpus("shards", spec, shards=shards)
    try:
        return Corpus("shards", spec, shards=expand_urls(spec))
    except (FileNotFoundError, ValueError) as err:
        raise ZeroShotError(str(err)) from err


def _given_classes(args: argparse.Namespace) -> Optional[list[str]]:
    if args.classes and args.classes_file:
        raise ZeroShotError("give --classes or --classes-file, not both")
    if args.classes:
        names = [c.strip() for c in args.classes.split(",") if c.strip()]
    elif args.classes_file:
        with open(args.classes_file, encoding="utf-8") as fh:
            text = fh.read()
        names = json.loads(text) if args.classes_file.endswith(".json") else [l.strip() for l in text.splitlines()]
        names = [str(n).strip() for n in names if str(n).strip()]
    else:
        return None
    if not names:
        raise ZeroShotError("--classes/--classes-file names no class")
    return names


def class_names_for(corpus: Corpus, given: Optional[list[str]]) -> Optional[list[str]]:
    """The names put into the prompts, in label order; None for a shard set without class names (then its
    samples must not carry labels)."""
    from data_pipelines.metadata import read_classes

    if corpus.kind == "folder":
        if given is not None and len(given) != len(corpus.folder_classes):
            raise ZeroShotError(f"{len(given)} class names given but {corpus.source} has {len(corpus.folder_classes)} "
                                f"class sub-directories ({', '.join(corpus.folder_classes[:5])}, ...); name them all, "
                                "in sorted order")
        return given or [c.replace("_", " ") for c in corpus.folder_classes]
    if given is not None:
        return given
    names = read_classes(corpus.shards)
    return [n.replace("_", " ") for n in names] if names else None
