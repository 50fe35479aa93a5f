"""Shard patterns -> shard URLs: brace expansion, '::' lists, local globs, and the names of shards.

A pattern names a shard set the way WebDataset users write it: `train-{000000..000099}.tar` (brace
expansion), several patterns joined by '::', shell globs for local paths, remote URLs (http(s)://, s3://,
gs://, ...), or a list of any of these. Local shards must exist before training starts; remote ones are
checked by the reader (`shards.check_remote`) when the stream is built.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import braceexpand

from .sources import REMOTE_SCHEMES, local_path, scheme

HOW_TO_MAKE_SHARDS = (
    "make shards with `vitx data synth OUT` (a synthetic demo corpus), `vitx data from-folder SRC OUT` "
    "(an image-folder tree) or `vitx data from-csv CAPTIONS IMAGES OUT` (image-caption pairs)"
)


def _pieces(pattern: str | Sequence[str]) -> list[str]:
    parts = [pattern] if isinstance(pattern, str) else list(pattern)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise TypeError(f"shard pattern must be a string or a list of strings, got {pattern!r}")
    return [piece.strip() for part in parts for piece in part.split("::") if piece.strip()]


def expand_urls(pattern: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs of a pattern: brace expansion ("train-{000000..000009}.tar"), '::'-separated lists,
    shell globs for local paths, or a list of any of these.

    Local paths must exist (FileNotFoundError naming the pattern otherwise). Remote URLs (http(s)://, s3://,
    gs://, hf://, ...; see `sources.REMOTE_SCHEMES`) pass through unchecked here: the stream checks the
    first one when it is built. `pipe:` URLs run a shell command for every shard; they are refused unless
    `allow_pipe=True`, so that a config file cannot run commands by accident.
    """
    urls: list[str] = []
    missing: list[str] = []
    for piece in _pieces(pattern):
        for url in braceexpand.braceexpand(piece):
            kind = scheme(url)
            if kind == "pipe":
                if not allow_pipe:
                    raise ValueError(
                        f"refusing the pipe: URL {url!r} in {pattern!r}: a pipe: URL runs a shell command for every "
                        "shard, so it is off unless you opt in with allow_pipe=True (data.allow_pipe: true)"
                    )
                urls.append(url)
            elif kind in REMOTE_SCHEMES:
                urls.append(url)
            elif kind not in ("", "file"):
                raise ValueError(
                    f"shard URL {url!r} in {pattern!r} has an unsupported scheme '{kind}://'; use a local path or "
                    + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
                )
            else:
                path = local_path(url)
                if any(c in path for c in "*?["):
                    found = sorted(glob.glob(path))
                    urls.extend(found)
                    if not found:
                        missing.append(url)
                elif os.path.isfile(path):
                    urls.append(path)
                else:
                    missing.append(url)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        what = "matches no file" if not urls else f"names {len(missing)} missing shard(s)"
        raise FileNotFoundError(f"shard pattern {pattern!r} {what}: {shown}; {HOW_TO_MAKE_SHARDS}")
    if not urls:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file; {HOW_TO_MAKE_SHARDS}")
    return urls


def pattern_count(pattern: str) -> int | None:
    """How many shards a brace pattern names (`train-{000000..000009}.tar` -> 10), None for globs and URLs."""
    if not pattern or any(c in pattern for c in "*?[") or "://" in pattern:
        return None
    return sum(len(list(braceexpand.braceexpand(p))) for p in _pieces(pattern))


def shard_name(url: str) -> str:
    """The file name of a shard URL or path: `s3://b/x/train-000001.tar` -> `train-000001.tar`."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def dir_and_name(url: str) -> tuple[str, str]:
    """Split a shard URL or path into (directory, file name); works for paths and URLs alike."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    head, _, name = url.rpartition("/")
    return (head or "."), name
