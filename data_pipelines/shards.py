"""Reading one WebDataset shard: tar members grouped into samples, exactly as sizes.json counts them.

A sample is the run of consecutive tar members sharing a key (webdataset's convention: `k.jpg`, `k.cls`).
`iter_shard` yields them with their index in the shard, so a reader can start inside a shard (two workers
may share one) and the counts it sees are the counts `vitx data inspect --write-sizes` records.
"""

from __future__ import annotations

from typing import Iterator, Optional

from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .sources import close_quietly, open_url


class ShardReadError(RuntimeError):
    """A shard could not be opened or ended early (truncated tar, vanished file, network error)."""


def iter_shard(url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[tuple[int, dict, Optional[str]]]:
    """Yield (index, sample, problem) for the samples of one shard with start <= index < stop.

    A sample is the run of consecutive tar members sharing a key (webdataset's convention); `index` counts
    samples from 0, matching the counts in sizes.json. `problem` is None for a well-formed sample, else a
    description (duplicate key in the shard, duplicate member in a sample). Samples before `start` are
    skipped without keeping their bytes. A failure to open or read the shard raises ShardReadError after the
    samples read so far.
    """
    index, current, problem = -1, None, None
    seen: set[str] = set()
    stream, early = None, False
    try:
        stream = open_url(url)
        for member in tar_file_iterator(stream):
            key, ext = base_plus_ext(member["fname"])
            if key is None:  # a member without extension is no part of any sample
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None and index >= start:
                    yield index, current, problem
                index += 1
                if stop is not None and index >= stop:
                    early = True
                    break
                current, problem = {"__key__": key, "__url__": url}, None
                if key in seen:
                    problem = f"duplicate key {key!r}"
                seen.add(key)
            if ext in current:
                problem = f"duplicate member {member['fname']!r}"
            if index >= start:
                current[ext] = member["data"]
        else:
            if current is not None and index >= start:
                yield index, current, problem
    except GeneratorExit:  # the reader stopped early: a downloader killed by the closed pipe is no error
        if stream is not None:
            close_quietly(stream)
        raise
    except Exception as exn:
        if stream is not None:
            close_quietly(stream)
        raise ShardReadError(f"{type(exn).__name__}: {exn}") from exn
    if stream is not None:
        if early:
            close_quietly(stream)
            return
        try:
            stream.close()  # a remote download's exit status is checked here
        except Exception as exn:
            raise ShardReadError(f"{type(exn).__name__}: {exn}") from exn


def count_samples(url: str) -> int:
    """Number of samples in a shard, grouped exactly as the reader groups them (for sizes.json)."""
    n = 0
    for _ in iter_shard(url):
        n += 1
    return n
