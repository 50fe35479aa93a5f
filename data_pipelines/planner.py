"""The epoch planner: which samples each (epoch, rank, dataloader worker) reads. Pure: no I/O, no
torch.distributed; every process computes the same global plan from the same numbers and takes its part.

* Shard order changes every epoch: shards are shuffled by a generator seeded by (seed, epoch).
* Exact epochs from the size file: the shuffled shards form one virtual sequence of N samples, cut into one
  contiguous range per (rank, worker). Every rank gets exactly T = floor(E / (batch_size * world_size))
  batches (E = N, or the user's epoch size when smaller); no sample is planned twice and every sample once
  except the tail of E - T * batch_size * world_size (< batch_size * world_size) samples, which falls on
  different samples every epoch. A range may start or end inside a shard: two workers then share the shard.
* Validation is exact and equal-length: the N validation samples are cut into contiguous per-rank ranges of
  N // R or N // R + 1 samples; every rank yields `val_batches_per_rank` batches, the places no sample fills
  being padding.
* Resampled streams draw shards with replacement (the stream does, seeded by (seed, epoch, rank, worker)); the
  plan only fixes how many batches each worker yields.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence


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


@functools.lru_cache(maxsize=8)
def _order(num_shards: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_shards))
    epoch_rng("shards", seed, epoch).shuffle(order)
    return tuple(order)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation, the same on every rank and worker."""
    return list(_order(num_shards, seed, epoch))


@functools.lru_cache(maxsize=8)
def _ends(order: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Where each shard of `order` ends in the concatenation: computed once per epoch, not once per slot (a
    process plans all its workers, and a simulation all ranks, from the same numbers)."""
    return tuple(itertools.accumulate(sizes[s] for s in order))


def _cut(order: Sequence[int], sizes: Sequence[int], offset: int, length: int) -> list[Piece]:
    """Pieces covering samples [offset, offset + length) of the concatenation of shards in `order`."""
    order, sizes = tuple(order), tuple(sizes)
    ends, pieces, end = _ends(order, sizes), [], offset + length
    i = bisect.bisect_right(ends, offset)  # the first shard ending after `offset`
    while i < len(order) and offset < end:
        start = ends[i] - sizes[order[i]]
        lo, hi = offset - start, min(end, ends[i]) - start
        if lo < hi:
            pieces.append(Piece(order[i], lo, hi))
        offset, i = ends[i], i + 1
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
            E = total  # an epoch is at most the corpus (the stream warns about the larger train_samples)
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
        order = _order(num_shards, seed, epoch)
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
        pieces = _cut(range(num_shards), sizes, rank_offset + w_offset, n_worker)
    else:  # only the epoch size is known: whole shards round robin, counts enforced by padding/truncation
        pieces = [Piece(s) for s in range(num_shards)[slot::slots]]
    return SlotPlan(pieces, quota[worker] + pad_batches, samples=n_worker, pad_batches=pad_batches, pad=pad)
