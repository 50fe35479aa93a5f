"""The one WebDataset streaming layer: URLs -> shards -> samples -> batches, for ViT, DeiT and CLIP alike.

WebDataset (Aizman et al. 2020, "High Performance I/O For Large Scale Deep Learning") stores a corpus as
tar shards read sequentially. This module decides, for every (epoch, rank, dataloader worker), which
samples that worker reads, so that the usual failure modes of sharded training cannot happen:

* Shard order changes every epoch: shards are shuffled with a generator seeded by (seed, epoch), and the
  epoch reaches persistent workers through shared memory (`ShardStream.set_epoch`, called by Lightning
  through `StreamLoader.sampler.set_epoch`, or automatically on every new pass over the loader).
* Exact epochs from the size file. With per-shard sizes (sizes.json), the shuffled shards form one virtual
  sequence of N samples, cut into one contiguous range per (rank, worker). Every rank gets exactly
  T = floor(E / (batch_size * world_size)) batches (E = N, or the user's epoch size when smaller); no sample
  is read twice and every sample is read once except the tail of E - T * batch_size * world_size
  (< batch_size * world_size) samples, which falls on different samples every epoch. A range may start or
  end inside a shard: that shard is read by two workers, each skipping to its own part.
* Validation is exact and equal-length: the N validation samples are cut into contiguous per-rank ranges
  of N // R or N // R + 1 samples; under data parallelism every rank yields the same number of batches, of
  exactly `batch_size`, the missing places filled with padding samples whose label is IGNORE_INDEX (-100,
  which `F.cross_entropy` ignores by default). A metric that skips them is the single-process metric.
* Resampled streams (for corpora too large for epochs): shards drawn with replacement by a generator seeded
  by (seed, epoch, rank, worker); the epoch size is given (or taken from the size file).
* Bad data is skipped, counted per shard and logged, never silent and never a crash: an image that fails to
  decode, a sample missing a required member, a duplicate key, a truncated tar, a shard that cannot be
  opened. Past `max_error_rate` (after `min_error_samples` samples) iteration stops with a RuntimeError.
  A training worker that falls short of its quota because of skipped samples re-reads its own range from
  the start to fill it (so the batch count stays exact); validation fills the gap with padding.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence

import braceexpand
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _InfiniteConstantSampler
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from .sources import REMOTE_SCHEMES, close_quietly, local_path, open_url, scheme
from .writers import shard_sizes

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of a padding sample; F.cross_entropy's default ignore_index
HOW_TO_MAKE_SHARDS = (
    "make shards with `vitx data synth OUT` (a synthetic demo corpus), `vitx data from-folder SRC OUT` "
    "(an image-folder tree) or `vitx data from-csv CAPTIONS IMAGES OUT` (image-caption pairs)"
)


# ----------------------------------------------------------------------------------------------------------
# URLs


def expand_urls(pattern: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs of a pattern: brace expansion ("train-{000000..000009}.tar"), '::'-separated lists,
    shell globs for local paths, or a list of any of these.

    Local paths must exist (FileNotFoundError naming the pattern otherwise). Remote URLs (http(s)://, s3://,
    gs://, hf://, ...; see `sources.REMOTE_SCHEMES`) pass through unchecked: they are opened when read.
    `pipe:` URLs run a shell command for every shard; they are refused unless `allow_pipe=True`, so that a
    config file cannot run commands by accident.
    """
    parts = [pattern] if isinstance(pattern, str) else list(pattern)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise TypeError(f"shard pattern must be a string or a list of strings, got {pattern!r}")
    urls: list[str] = []
    missing: list[str] = []
    for part in parts:
        for piece in part.split("::"):
            piece = piece.strip()
            if not piece:
                continue
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


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------------------
# reading samples out of one shard


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


# ----------------------------------------------------------------------------------------------------------
# error accounting


class ShardStats:
    """Samples read and samples lost, per shard, in shared memory so that dataloader workers' counts are
    visible in the main process (for logging)."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.read = torch.zeros(len(self.urls), dtype=torch.int64).share_memory_()
        self.errors = torch.zeros(len(self.urls), dtype=torch.int64).share_memory_()

    def add(self, shard: int, read: int = 0, errors: int = 0) -> None:
        # numpy views of the shared tensors: an increment costs ~0.1 us instead of ~30 us of tensor indexing
        if not hasattr(self, "_views"):
            self._views = (self.read.numpy(), self.errors.numpy())
        self._views[0][shard] += read
        self._views[1][shard] += errors

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_views", None)  # views are rebuilt in the receiving process, over its shared mapping
        return state

    def summary(self) -> dict[str, Any]:
        read, errors = int(self.read.sum()), int(self.errors.sum())
        by_shard = {_shard_name(self.urls[i]): int(self.errors[i]) for i in torch.nonzero(self.errors).flatten().tolist()}
        return {
            "samples": read,
            "errors": errors,
            "error_rate": errors / max(1, read + errors),
            "errors_by_shard": by_shard,
        }


class ErrorBudget:
    """Per-worker running error rate; raises once it exceeds `max_rate` after `min_samples` samples."""

    def __init__(self, stats: ShardStats, max_rate: float, min_samples: int, where: str):
        self.stats, self.max_rate, self.min_samples, self.where = stats, max_rate, min_samples, where
        self.ok = 0
        self.bad = 0
        self._logged = 0

    def good(self, shard: int) -> None:
        self.ok += 1
        self.stats.add(shard, read=1)

    def error(self, shard: int, reason: str, count: int = 1) -> None:
        self.bad += count
        self.stats.add(shard, errors=count)
        self._logged += 1
        if self._logged <= 20 or self._logged % 1000 == 0:
            log.warning(
                "skipped %d sample(s) of shard %s: %s [%s; %d skipped so far]",
                count, self.stats.urls[shard], reason, self.where, self.bad,
            )
        self.check()

    def check(self) -> None:
        total = self.ok + self.bad
        if total >= self.min_samples and (self.bad > self.max_rate * total or self.ok == 0):
            worst = self.stats.summary()["errors_by_shard"]
            worst = dict(sorted(worst.items(), key=lambda kv: -kv[1])[:5])
            raise RuntimeError(
                f"too much bad data: {self.bad} of {total} samples skipped ({self.bad / total:.1%} > "
                f"max_error_rate={self.max_rate:.1%}) [{self.where}]; worst shards: {worst}. Check the shards "
                "with `vitx data inspect PATTERN`, rewrite or drop the bad ones, or raise max_error_rate."
            )


# ----------------------------------------------------------------------------------------------------------
# the epoch plan: which samples each (rank, worker) reads


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard number `shard` (stop None: to the end of the shard)."""

    shard: int
    start: int = 0
    stop: Optional[int] = None


@dataclass
class SlotPlan:
    """What one dataloader worker of one rank does in one epoch.

    pieces: what it reads, in order (None for a resampled stream, which draws shards at random).
    batches: how many batches it yields (None: until its pieces are exhausted).
    samples: real samples it yields before padding (validation; None: as many as it reads).
    pad_batches: extra all-padding batches (validation under data parallelism: equal batch counts).
    pad: pad a short last batch to `batch_size` and replace unreadable samples by padding.
    refill: re-read the pieces when they run out before `batches` is reached (training).
    """

    pieces: Optional[list[Piece]]
    batches: Optional[int]
    samples: Optional[int] = None
    pad_batches: int = 0
    pad: bool = False
    refill: bool = False


def epoch_rng(*key: int | str) -> random.Random:
    """A generator seeded by a tuple of ints/strings, independent of PYTHONHASHSEED."""
    return random.Random(":".join(str(k) for k in key))


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation, the same on every rank and worker."""
    order = list(range(num_shards))
    epoch_rng("shards", seed, epoch).shuffle(order)
    return order


def _cut(order: Sequence[int], sizes: Sequence[int], offset: int, length: int) -> list[Piece]:
    """Pieces covering samples [offset, offset + length) of the concatenation of shards in `order`."""
    pieces, pos, end = [], 0, offset + length
    for shard in order:
        n = sizes[shard]
        lo, hi = max(offset, pos), min(end, pos + n)
        if lo < hi:
            pieces.append(Piece(shard, lo - pos, hi - pos))
        pos += n
        if pos >= end:
            break
    return pieces


def _split_batches(total: int, parts: int) -> list[int]:
    """Split `total` batches over `parts` workers as evenly as possible, the first ones taking the extra."""
    return [total // parts + (1 if w < total % parts else 0) for w in range(parts)]


def train_batches_per_rank(epoch_samples: int, batch_size: int, world_size: int) -> int:
    """floor(E / (batch_size * world_size)): the training batches every rank yields in an epoch."""
    return epoch_samples // (batch_size * world_size)


def val_batches_per_rank(num_samples: int, batch_size: int, world_size: int) -> int:
    """ceil(ceil(N / R) / batch_size): the validation batches every rank yields (the largest rank's count)."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def plan_slot(
    *,
    train: bool,
    num_shards: int,
    sizes: Optional[Sequence[int]],
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    epoch_samples: Optional[int] = None,
    resampled: bool = False,
) -> SlotPlan:
    """The plan of worker `worker` (of `num_workers`) on rank `rank` (of `world_size`) for `epoch`.

    Pure and deterministic: every process computes the same global plan and takes its own part.
    """
    R, W, B = world_size, max(1, num_workers), batch_size
    if not (0 <= rank < R and 0 <= worker < W):
        raise ValueError(f"rank {rank} / world {R}, worker {worker} / workers {W} out of range")
    total = sum(sizes) if sizes is not None else None
    slot, slots = rank * W + worker, R * W

    if train:
        E = epoch_samples if epoch_samples is not None else total
        if total is not None and E is not None and E > total and not resampled:
            log.warning("train_samples=%d exceeds the %d samples in the size file; using %d", E, total, total)
            E = total
        if resampled:
            if E is None:
                raise ValueError("a resampled stream needs an epoch size: set train_samples (no sizes.json found)")
            T = train_batches_per_rank(E, B, R)
            return SlotPlan(None, _split_batches(T, W)[worker], refill=True)
        if num_shards < slots:
            raise ValueError(
                f"{num_shards} training shard(s) cannot feed {R} rank(s) x {W} dataloader worker(s) = {slots} readers "
                "without reading some shards twice per epoch: write more, smaller shards (--shard-size), use fewer "
                "workers (num_workers), or a resampled stream (resampled=True)"
            )
        order = shard_order(num_shards, seed, epoch)
        if E is None:
            if R > 1:
                raise ValueError(
                    "training on several ranks needs the epoch size, so that every rank runs the same number of "
                    "batches: add a sizes.json beside the shards (`vitx data inspect PATTERN --write-sizes`) "
                    "or set train_samples"
                )
            return SlotPlan([Piece(s) for s in order[slot::slots]], None)
        T = train_batches_per_rank(E, B, R)
        if T == 0:
            raise ValueError(f"an epoch of {E} samples is smaller than one global batch ({B} x {R} ranks); lower batch_size")
        quota = _split_batches(T, W)
        if sizes is None:  # whole shards, round robin; re-read when short
            return SlotPlan([Piece(s) for s in order[slot::slots]], quota[worker], refill=True)
        offset = rank * T * B + sum(quota[:worker]) * B
        return SlotPlan(_cut(order, sizes, offset, quota[worker] * B), quota[worker], refill=True)

    # validation: no shuffling, every sample exactly once across ranks
    pad = R > 1
    N = total if total is not None else epoch_samples
    if N is None:
        if R > 1:
            raise ValueError(
                "validation on several ranks needs the number of samples, so that every rank runs the same number "
                "of batches: add a sizes.json beside the shards (`vitx data inspect PATTERN --write-sizes`) or set "
                "val_samples"
            )
        return SlotPlan([Piece(s) for s in range(num_shards)[slot::slots]], None)
    n_rank = N // R + (1 if rank < N % R else 0)
    rank_offset = rank * (N // R) + min(rank, N % R)
    b_rank = math.ceil(n_rank / B)
    quota = _split_batches(b_rank, W)
    w_offset = sum(quota[:worker]) * B
    n_worker = max(0, min(quota[worker] * B, n_rank - w_offset))
    extra = val_batches_per_rank(N, B, R) - b_rank if pad else 0
    pad_batches = extra if worker == (b_rank % W if b_rank % W else 0) else 0
    if sizes is not None:
        pieces = _cut(list(range(num_shards)), sizes, rank_offset + w_offset, n_worker)
    else:  # only the epoch size is known: whole shards round robin, counts enforced by padding/truncation
        pieces = [Piece(s) for s in range(num_shards)[slot::slots]]
    return SlotPlan(pieces, quota[worker] + pad_batches, samples=n_worker, pad_batches=pad_batches, pad=pad)


# ----------------------------------------------------------------------------------------------------------
# the dataset


class SampleDecoder(Protocol):
    """What a family of samples needs: which members it requires, how to decode one, how to batch."""

    def check(self, sample: dict) -> Optional[str]:
        """None if the sample has what decoding needs, else what is missing."""

    def decode(self, sample: dict, rng: random.Random, epoch: int, train: bool) -> Any:
        """Sample dict -> one item; may raise on corrupt data (counted and skipped)."""

    def pad(self) -> Any:
        """A padding item (validation under data parallelism)."""

    def collate(self, items: list) -> Any:
        """A list of items -> one batch."""


def _shuffled(src: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `bufsize` items (items leave in random order)."""
    buf: list = []
    try:
        for item in src:
            if len(buf) < bufsize:
                buf.append(item)
                continue
            i = rng.randrange(bufsize)
            out, buf[i] = buf[i], item
            yield out
        rng.shuffle(buf)
        yield from buf
    finally:
        if hasattr(src, "close"):
            src.close()


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Batches from WebDataset shards, planned per (epoch, rank, worker) by `plan_slot`.

    Yields whole batches (made in the dataloader worker, so use `StreamLoader` or `batch_size=None`).
    `len()` is the number of batches per rank per epoch when it is known (size file or epoch size given).

    Args:
        urls: shard pattern(s) for `expand_urls`.
        decoder: the family's SampleDecoder (`samples.ImageLabelDecoder`, `samples.ImageTextDecoder`).
        batch_size: samples per batch on this rank.
        train: training (shuffled shards and samples, random crops, exact epoch quota) or validation
            (every sample once across ranks, padded to equal batch counts under data parallelism).
        seed: with the epoch (and rank, worker), seeds shard order, sample shuffle and augmentation.
        shuffle_buffer: training samples (raw bytes) shuffled together per worker.
        epoch_samples: the epoch size without a size file; with one, a smaller value shortens the epoch.
        resampled: draw training shards with replacement (needs an epoch size).
        max_error_rate: share of skipped samples past which a worker stops with a RuntimeError.
        min_error_samples: samples a worker reads before the error rate is judged.
        rank, world_size: this process's place; default torch.distributed's, else (0, 1).
        allow_pipe: accept pipe: URLs (shell commands).
        sizes: samples per shard, overriding the size file.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        decoder: SampleDecoder,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epoch_samples: Optional[int] = None,
        resampled: bool = False,
        max_error_rate: float = 0.01,
        min_error_samples: int = 100,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        allow_pipe: bool = False,
        sizes: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate}")
        self.urls = expand_urls(urls, allow_pipe=allow_pipe)
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.urls)
        if self.sizes is not None and len(self.sizes) != len(self.urls):
            raise ValueError(f"{len(self.sizes)} sizes for {len(self.urls)} shards")
        self.decoder = decoder
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.epoch_samples, self.resampled = epoch_samples, resampled and train
        self.max_error_rate, self.min_error_samples = max_error_rate, min_error_samples
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else rank
        self.world_size = d_world if world_size is None else world_size
        self.stats = ShardStats(self.urls)
        # the epoch lives in shared memory: persistent workers read it at the start of every pass
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    # -- epoch ------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    # -- length -----------------------------------------------------------------------------------------
    @property
    def num_samples(self) -> Optional[int]:
        """Samples in the shards according to the size file (None without one)."""
        return sum(self.sizes) if self.sizes is not None else None

    def batches_per_rank(self) -> Optional[int]:
        total = self.num_samples
        if self.train:
            E = self.epoch_samples if self.epoch_samples is not None else total
            if E is None:
                return None
            if total is not None and not self.resampled:
                E = min(E, total)
            return train_batches_per_rank(E, self.batch_size, self.world_size)
        N = total if total is not None else self.epoch_samples
        if N is None:
            return None
        return val_batches_per_rank(N, self.batch_size, self.world_size)

    def __len__(self) -> int:
        n = self.batches_per_rank()
        if n is None:
            raise TypeError("epoch length unknown: no sizes.json beside the shards and no epoch size given")
        return n

    # -- iteration --------------------------------------------------------------------------------------
    def plan(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> SlotPlan:
        return plan_slot(
            train=self.train, num_shards=len(self.urls), sizes=self.sizes, epoch=epoch, seed=self.seed,
            rank=rank, world_size=world_size, worker=worker, num_workers=num_workers,
            batch_size=self.batch_size, epoch_samples=self.epoch_samples, resampled=self.resampled,
        )

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_slot(self.epoch, self.rank, self.world_size, worker, num_workers)

    def _read_pieces(self, pieces: Iterable[Piece], budget: ErrorBudget, good: list[int]) -> Iterator[tuple[int, dict]]:
        """(shard, sample) for the well-formed samples of `pieces`, in order; problems go to `budget`."""
        for piece in pieces:
            next_index = piece.start
            reader = iter_shard(self.urls[piece.shard], piece.start, piece.stop)
            try:
                for index, sample, problem in reader:
                    next_index = index + 1
                    if problem is None:
                        problem = self.decoder.check(sample)
                    if problem is not None:
                        budget.error(piece.shard, problem)
                        continue
                    good[0] += 1
                    yield piece.shard, sample
            except ShardReadError as exn:
                lost = piece.stop - next_index if piece.stop is not None else 1
                budget.error(piece.shard, f"shard unreadable after sample {next_index}: {exn}", max(1, lost))
                continue
            finally:
                reader.close()
            if piece.stop is not None and next_index < piece.stop:
                budget.error(
                    piece.shard,
                    f"shard ended after {next_index} samples but the size file promises {piece.stop}",
                    piece.stop - next_index,
                )

    def _samples(self, plan: SlotPlan, rng: random.Random, budget: ErrorBudget) -> Iterator[tuple[int, dict]]:
        """The slot's sample stream: one pass over its pieces through the shuffle buffer (training), then,
        when the plan refills, further passes; the buffer drains at the end of every pass so that a pass
        yields exactly its own samples before the next one starts."""
        passes = 0
        while True:
            if plan.pieces is None:  # resampled: shards with replacement, forever
                pieces: Iterable[Piece] = (Piece(rng.randrange(len(self.urls))) for _ in iter(int, 1))
            else:
                pieces = plan.pieces
            good = [0]
            src: Iterable = self._read_pieces(pieces, budget, good)
            if self.shuffle_buffer > 1:
                src = _shuffled(src, self.shuffle_buffer, rng)
            yield from src
            passes += 1
            if not plan.refill:
                return
            if good[0] == 0:
                raise RuntimeError(
                    f"no readable sample in this worker's shards ({len(plan.pieces or [])} pieces) after {passes} "
                    "pass(es); check them with `vitx data inspect PATTERN`"
                )

    def iter_slot(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator:
        """Batches of one (epoch, rank, worker); public so tests can simulate ranks and workers."""
        plan = self.plan(epoch, rank, world_size, worker, num_workers)
        rng = epoch_rng("samples", self.seed, epoch, rank, worker)
        where = f"rank {rank} worker {worker} epoch {epoch}"
        budget = ErrorBudget(self.stats, self.max_error_rate, self.min_error_samples, where)
        samples = self._samples(plan, rng, budget)
        try:
            yield from self._batches(plan, samples, rng, budget, epoch)
        finally:
            samples.close()  # stop reading (closes the open shard) when the quota is met early

    def _batches(self, plan: SlotPlan, samples: Iterable, rng: random.Random, budget: ErrorBudget, epoch: int) -> Iterator:
        B, made, real = self.batch_size, 0, 0
        items: list = []
        if plan.samples == 0:
            samples = ()  # nothing of its own to read: this worker only pads
        if plan.batches != 0:
            for shard, sample in samples:
                if plan.samples is not None and real >= plan.samples:
                    break
                try:
                    item = self.decoder.decode(sample, rng, epoch, self.train)
                except Exception as exn:
                    budget.error(shard, f"{sample.get('__key__')}: cannot decode ({type(exn).__name__}: {exn})")
                    continue
                budget.good(shard)
                items.append(item)
                real += 1
                if len(items) == B:
                    yield self.decoder.collate(items)
                    items, made = [], made + 1
                    if plan.batches is not None and made >= plan.batches:
                        return
        # the pieces are exhausted or the sample quota met: pad validation, drop a partial training batch
        if plan.pad:
            missing = (plan.samples or 0) - real  # samples lost to bad data become padding
            while missing > 0 or 0 < len(items) < B:
                items.append(self.decoder.pad())
                missing -= 1
                if len(items) == B:
                    yield self.decoder.collate(items)
                    items, made = [], made + 1
            for _ in range((plan.batches or 0) - made):
                yield self.decoder.collate([self.decoder.pad() for _ in range(B)])
        elif items and not self.train:
            yield self.decoder.collate(items)


# ----------------------------------------------------------------------------------------------------------
# the loader


class _EpochSampler(_InfiniteConstantSampler):
    """The dummy sampler of an iterable-style DataLoader, plus `set_epoch` (which Lightning calls on
    `loader.sampler` before every epoch) forwarded to the stream."""

    def __init__(self, loader: "StreamLoader"):
        super().__init__()
        # a weak reference: a cycle loader <-> sampler would keep the loader (and its persistent worker
        # processes) alive until a garbage collection, which then stalls whatever code it interrupts
        self._loader = weakref.ref(loader)

    def set_epoch(self, epoch: int) -> None:
        loader = self._loader()
        if loader is not None:
            loader.set_epoch(epoch)


class StreamLoader(DataLoader):
    """DataLoader for a ShardStream: batches come from the workers whole (batch_size=None).

    Each new pass over the loader starts the next epoch unless `set_epoch(e)` named it first (Lightning
    does, through `loader.sampler.set_epoch`); the epoch reaches persistent workers through shared memory.
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = 2,
        **kwargs: Any,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            **kwargs,
        )
        # configuration errors (too few shards for ranks x workers, no epoch size under DDP) surface here,
        # in the main process, rather than as a traceback from inside a worker
        dataset.plan(0, dataset.rank, dataset.world_size, 0, max(1, num_workers))
        # Lightning calls set_epoch on loader.sampler; DataLoader forbids assigning it after __init__,
        # and an iterable-style loader only ever draws `None` from it, so swap in a sampler that forwards.
        object.__setattr__(self, "sampler", _EpochSampler(self))
        self._next_epoch: Optional[int] = None

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch if self._next_epoch is not None else self.dataset.epoch + (1 if getattr(self, "_started", False) else 0)
        self.dataset.set_epoch(epoch)
        self._next_epoch = None
        self._started = True
        return super().__iter__()
