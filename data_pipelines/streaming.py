"""The one WebDataset streaming layer: shards -> samples -> batches, for ViT, DeiT and CLIP alike.

WebDataset (Aizman et al. 2020, "High Performance I/O For Large Scale Deep Learning") stores a corpus as
tar shards read sequentially. `planner.py` decides, for every (epoch, rank, dataloader worker), which
samples that worker reads; this module reads them (`shards.iter_shard`), shuffles them in a buffer, decodes
and batches them in the dataloader workers, and accounts for bad data:

* The epoch reaches persistent workers through shared memory (`ShardStream.set_epoch`, called by Lightning
  through `StreamLoader.sampler.set_epoch`, or automatically on every new pass over the loader).
* Every rank yields the same number of batches (the planner's), so no collective operation hangs;
  validation pads with samples whose label is IGNORE_INDEX (-100, which `F.cross_entropy` ignores).
* Bad data is skipped, counted per shard and logged, never silent and never a crash: an image that fails to
  decode, a sample missing a required member, a duplicate key, a truncated tar, a shard that cannot be
  opened. Past `max_error_rate` (after `min_error_samples` samples) iteration stops with a RuntimeError.
  A training worker that falls short of its quota because of skipped samples re-reads its own range from
  the start to fill it (so the batch count stays exact); validation fills the gap with padding.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .budget import ErrorBudget, ShardStats
from .distributed import rank_world
from .metadata import shard_sizes
from .planner import Piece, SlotPlan, epoch_rng, plan_slot, train_batches_per_rank, val_batches_per_rank
from .position import StreamPosition
from .samples import SampleDecoder
from .shards import BACKOFF, ShardReadError, check_remote, iter_shard
from .urls import expand_urls

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# the dataset


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
        retries: reopen attempts of a remote shard whose read fails (default `shards.RETRIES`); the first
            remote shard is opened here, with the same retries, so a wrong URL fails before training.
        retry_backoff: seconds before the first reopen, doubling with every further attempt.
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
        retries: Optional[int] = None,
        retry_backoff: float = BACKOFF,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {max_error_rate}")
        self.urls = expand_urls(urls, allow_pipe=allow_pipe)
        self.read_options: dict[str, Any] = {"retries": retries, "backoff": retry_backoff}
        check_remote(self.urls, urls, retries, retry_backoff)
        self.sizes = list(sizes) if sizes is not None else shard_sizes(self.urls)
        if self.sizes is not None and len(self.sizes) != len(self.urls):
            raise ValueError(f"{len(self.sizes)} sizes for {len(self.urls)} shards")
        if train and not resampled and self.sizes is not None and (epoch_samples or 0) > sum(self.sizes):
            log.warning("train_samples=%d exceeds the %d samples in the size file; using %d",
                        epoch_samples, sum(self.sizes), sum(self.sizes))
        self.decoder = decoder
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.epoch_samples, self.resampled = epoch_samples, resampled and train
        self.max_error_rate, self.min_error_samples = max_error_rate, min_error_samples
        d_rank, d_world = rank_world()
        self.rank = d_rank if rank is None else rank
        self.world_size = d_world if world_size is None else world_size
        self.stats = ShardStats(self.urls)
        # the epoch lives in shared memory: persistent workers read it at the start of every pass
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        # where each worker stands in the epoch (shared memory), made by the StreamLoader that reads the stream
        self._position: Optional[StreamPosition] = None

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
        # a generator: the epoch and the position are read at the first batch asked for, not when a worker makes
        # its iterator (at its start, before the loader has named the pass's epoch)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resume = None
        if self._position is not None and self._position.num_workers == num_workers:
            worker = self._position.slot(worker)  # rotated in a resumed epoch: the DataLoader starts at worker 0
            resume = self._position.resume_for(worker)
        yield from self.iter_slot(self.epoch, self.rank, self.world_size, worker, num_workers, resume=resume)

    def _read_pieces(
        self, pieces: Iterable[Piece], budget: ErrorBudget, good: list[int], counted: bool
    ) -> Iterator[tuple[int, dict, bool]]:
        """(shard, sample, counted) for the well-formed samples of `pieces`, in order; problems go to `budget`
        (`counted=False` on a refill pass: those samples were judged on the first)."""
        for piece in pieces:
            next_index = piece.start
            reader = iter_shard(self.urls[piece.shard], piece.start, piece.stop, **self.read_options)
            try:
                for index, sample, problem in reader:
                    next_index = index + 1
                    if problem is None:
                        problem = self.decoder.check(sample)
                    if problem is not None:
                        budget.error(piece.shard, problem, counted=counted)
                        continue
                    good[0] += 1
                    yield piece.shard, sample, counted
            except ShardReadError as exn:
                lost = piece.stop - next_index if piece.stop is not None else 1
                budget.error(piece.shard, f"shard unreadable after sample {next_index}: {exn}", max(1, lost), counted)
                continue
            finally:
                reader.close()
            if piece.stop is not None and next_index < piece.stop:
                budget.error(
                    piece.shard,
                    f"shard ended after {next_index} samples but the size file promises {piece.stop}",
                    piece.stop - next_index, counted,
                )

    def _samples(self, plan: SlotPlan, rng: random.Random, budget: ErrorBudget) -> Iterator[tuple[int, dict, bool]]:
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
            src: Iterable = self._read_pieces(pieces, budget, good, counted=passes == 0)
            if self.shuffle_buffer > 1:
                src = _shuffled(src, self.shuffle_buffer, rng)
            yield from src
            passes += 1
            if not plan.refill:
                return
            if good[0] == 0:
                budget.finish(len(plan.pieces or []))  # says what was wrong with the range, if it can
                raise RuntimeError(
                    f"no readable sample in this worker's shards ({len(plan.pieces or [])} pieces) after {passes} "
                    "pass(es); check them with `vitx data inspect PATTERN`"
                )

    def iter_slot(
        self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
        resume: Optional[tuple[int, ...]] = None,
    ) -> Iterator:
        """Batches of one (epoch, rank, worker); public so tests can simulate ranks and workers. `resume`:
        (batches made, samples drawn, good, skipped, real) of a `progress` record: continue after that batch."""
        plan = self.plan(epoch, rank, world_size, worker, num_workers)
        rng = epoch_rng("samples", self.seed, epoch, rank, worker)  # shard draws and the shuffle buffer
        where = f"rank {rank} worker {worker} epoch {epoch}"
        budget = ErrorBudget(self.stats, self.max_error_rate, self.min_error_samples, where)
        samples = self._samples(plan, rng, budget)
        try:
            yield from self._batches(plan, samples, budget, (epoch, rank, worker), resume)
        finally:
            samples.close()  # stop reading (closes the open shard) when the quota is met early

    def _batches(self, plan: SlotPlan, samples: Iterator, budget: ErrorBudget, slot: tuple, resume) -> Iterator:
        B, made, real, drawn = self.batch_size, 0, 0, 0
        items: list = []
        if plan.samples == 0:
            samples = iter(())  # nothing of its own to read: this worker only pads
        if resume is not None:  # replay the stream up to the saved batch without decoding (same shuffle)
            made, drawn, ok, bad, real = resume
            budget.muted = True
            for _ in range(drawn):
                if next(samples, None) is None:
                    raise RuntimeError(f"cannot resume [{budget.where}]: the shards no longer hold the saved position")
            budget.muted, budget.ok, budget.bad = False, ok, bad
        # augmentation is seeded per batch, so that a resumed stream augments its batches as the original did
        rng = epoch_rng("augment", self.seed, *slot, made)
        if plan.batches is None or made < plan.batches:
            for shard, sample, counted in samples:
                if plan.samples is not None and real >= plan.samples:
                    break
                drawn += 1
                try:
                    item = self.decoder.decode(sample, rng, slot[0], self.train)
                except Exception as exn:
                    budget.error(shard, f"{sample.get('__key__')}: cannot decode ({type(exn).__name__}: {exn})", 1, counted)
                    continue
                budget.good(shard, counted)
                items.append(item)
                real += 1
                if len(items) == B:
                    batch, items, made = self.decoder.collate(items), [], made + 1
                    self._record(slot[2], made, drawn, budget, real)
                    yield batch
                    if plan.batches is not None and made >= plan.batches:
                        break
                    rng = epoch_rng("augment", self.seed, *slot, made)
        budget.finish(len(plan.pieces) if plan.pieces is not None else 1)
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

    def _record(self, worker: int, made: int, drawn: int, budget: ErrorBudget, real: int) -> None:
        if self._position is not None:
            self._position.record(worker, made, drawn, budget.ok, budget.bad, real)

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        """Where this rank stands in the current epoch: a dict of ints to save (each rank its own) and give
        to `load_state_dict` of a fresh stream, whose loader then yields exactly the remaining batches of the
        epoch, in the same order, with the same augmentation. Needs the stream to be read by a StreamLoader.

        `batches_done`: how many of this epoch's batches were used, counting those read before a resume
        (default: all the loader handed out); a consumer that fetches ahead passes its own count.
        `StreamLoader.state_dict` is what checkpoints hold: this state for every rank."""
        if self._position is None:
            raise RuntimeError("the stream's position is kept only when it is read through a StreamLoader")
        return self._position.state(self.epoch, self.rank, self.world_size, batches_done)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` (from `state_dict`): the next pass of the loader reads the rest of its epoch."""
        if self._position is None:
            raise RuntimeError("load the state after making the StreamLoader that reads this stream")
        self._position.load(state, self.rank, self.world_size)
        self.set_epoch(state["epoch"])
