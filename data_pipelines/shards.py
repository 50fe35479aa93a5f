"""Reading one WebDataset shard: tar members grouped into samples, exactly as sizes.json counts them.

A sample is the run of consecutive tar members sharing a key (webdataset's convention: `k.jpg`, `k.cls`).
`iter_shard` yields them with their index in the shard, so a reader can start inside a shard (two workers
may share one) and the counts it sees are the counts `vitx data inspect --write-sizes` records.

Two ways a shard lies, both caught here:

* A tar cut short at a member boundary reads, with Python's `tarfile`, as a shorter but valid archive. A
  complete tar ends with zero blocks; a shard without them is truncated (`ShardReadError`), and the
  sample read last is not trusted either (more of its members may have been cut off).
* A remote read that breaks (connection refused, reset, cut short) is retried with exponential backoff:
  the shard is reopened and read on from the sample where it broke, the samples already yielded skipped
  without their bytes being kept, so no sample is yielded twice. Past the retries, ShardReadError.
"""

from __future__ import annotations

import logging
import re
import tarfile
import time
from typing import Callable, Iterator, Optional

from webdataset.tariterators import base_plus_ext

from .sources import close_quietly, open_url, scheme

log = logging.getLogger(__name__)

RETRIES = 3  # reopen attempts of a remote shard after a failure (the waits: backoff, 2 backoff, 4 backoff, ...)
BACKOFF = 1.0  # seconds before the first reopen
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members like __index__ are no part of a sample


class ShardReadError(RuntimeError):
    """A shard could not be opened or ended early (truncated tar, vanished file, network error)."""


class _Truncated(Exception):
    pass


def retriable(url: str) -> bool:
    """Remote reads (http(s), s3, gs, ...) are retried; local files and pipe: commands are not."""
    return scheme(url) not in ("", "file", "pipe")


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes why `tarfile` stopped: only a zero block is an end of archive; an end of data or a short or
    invalid header, which tarfile also takes as the end past the first member, is a truncated shard."""

    @classmethod
    def fromtarfile(cls, tar):  # noqa: D102 - tarfile's hook for reading one header
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.vitx_end = "end-of-archive"
            raise
        except tarfile.HeaderError as exn:
            tar.vitx_end = f"{type(exn).__name__}: {exn}"
            raise


def _members(stream) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(member name, read its bytes) for the regular members of a tar stream, then a check that the archive
    ended with its end-of-archive blocks (raises _Truncated otherwise). Members whose bytes are not asked
    for are skipped by tarfile without being kept."""
    tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)  # reads the first header already
    for info in tar:
        if info.isreg() and not _META.match(info.name):
            yield info.name, lambda info=info: tar.extractfile(info).read()
        tar.members = []  # a shard may hold millions of members: keep none
    end = getattr(tar, "vitx_end", "end of data")
    if end != "end-of-archive":
        raise _Truncated(f"truncated tar: no end-of-archive blocks after byte {tar.offset} ({end})")


def iter_shard(
    url: str,
    start: int = 0,
    stop: Optional[int] = None,
    retries: Optional[int] = None,
    backoff: float = BACKOFF,
) -> Iterator[tuple[int, dict, Optional[str]]]:
    """Yield (index, sample, problem) for the samples of one shard with start <= index < stop.

    `index` counts samples from 0, matching the counts in sizes.json. `problem` is None for a well-formed
    sample, else a description (duplicate key in the shard, duplicate member in a sample). Samples before
    `start` are skipped without keeping their bytes. A remote shard whose read fails is reopened up to
    `retries` times (default RETRIES) after waits of backoff, 2 backoff, ... seconds, and read on from the
    first sample not yet yielded. A failure past that, a local read error or a truncated tar raises
    ShardReadError after the samples read so far (the last sample before a truncation is dropped).
    """
    attempts = (RETRIES if retries is None else retries) if retriable(url) else 0
    seen: set[str] = set()
    done = 0  # samples [0, done) were handled (yielded, skipped before start, or passed) by some attempt
    failures = 0
    while True:
        stream = None
        try:
            stream = open_url(url)
            index, current, problem, members = -1, None, None, _members(stream)
            for name, read in members:
                key, ext = base_plus_ext(name)
                if key is None:  # a member without extension is no part of any sample
                    continue
                ext = ext.lower()
                if current is None or key != current["__key__"]:
                    if current is not None and index >= done:
                        seen.add(current["__key__"])
                        done = index + 1
                        if index >= start:
                            yield index, current, problem
                    index += 1
                    if stop is not None and index >= stop:
                        members.close()
                        close_quietly(stream)  # stopped early: a downloader killed by the closed pipe is no error
                        return
                    current, problem = {"__key__": key, "__url__": url}, None
                    if index >= done and key in seen:
                        problem = f"duplicate key {key!r}"
                if index < max(start, done):
                    continue  # before this reader's part, or yielded before a reopen: not kept
                if ext in current:
                    problem = f"duplicate member {name!r}"
                current[ext] = read()
            if current is not None and index >= done:  # the archive ended properly: its last sample is whole
                seen.add(current["__key__"])
                done = index + 1
                if index >= start:
                    yield index, current, problem
            stream.close()  # a remote download's exit status is checked here
            return
        except GeneratorExit:  # the reader stopped early
            if stream is not None:
                close_quietly(stream)
            raise
        except Exception as exn:
            if stream is not None:
                close_quietly(stream)
            reason = str(exn) if isinstance(exn, _Truncated) else f"{type(exn).__name__}: {exn}"
            if failures < attempts:
                failures += 1
                wait = backoff * 2 ** (failures - 1)
                log.warning("reading %s failed after %d samples (%s); reopening in %.1fs (attempt %d of %d)",
                            url, done, reason, wait, failures, attempts)
                time.sleep(wait)
                continue
            tries = f" (after {failures + 1} attempts)" if attempts else ""
            raise ShardReadError(f"{reason}{tries}") from exn


def count_samples(url: str) -> int:
    """Number of samples in a shard, grouped exactly as the reader groups them (for sizes.json)."""
    n = 0
    for _ in iter_shard(url):
        n += 1
    return n


def check_remote(urls: list[str], pattern: object, retries: Optional[int] = None, backoff: float = BACKOFF) -> None:
    """Open the first remote shard of `urls` and read its first header, with the same retries as a read, so
    that a wrong host, a missing bucket or a server that is down fails before training rather than as a
    run of skipped shards. FileNotFoundError naming the pattern and the URL when it cannot be read."""
    url = next((u for u in urls if retriable(u)), None)
    if url is None:
        return
    attempts = RETRIES if retries is None else retries
    for attempt in range(attempts + 1):
        stream = None
        try:
            stream = open_url(url)
            head = stream.read(512)
            if len(head) < 512:
                raise OSError(f"only {len(head)} bytes where a tar header of 512 was expected")
            return
        except Exception as exn:
            if attempt == attempts:
                raise FileNotFoundError(
                    f"cannot read the first shard {url} of {pattern!r} ({attempts + 1} attempts): "
                    f"{type(exn).__name__}: {exn}. Check the URL, that the server is up, and the credentials"
                ) from exn
            time.sleep(backoff * 2 ** attempt)
        finally:
            if stream is not None:
                close_quietly(stream)
