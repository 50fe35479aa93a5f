"""Where a stream stands in its epoch, so that a resumed run reads exactly the batches an uninterrupted one would.

A worker's batches are a pure function of (seed, epoch, rank, worker) and the data: the plan fixes its range,
the shuffle buffer and shard draws are seeded by the slot, augmentation is seeded per batch. So a worker's
position after its batch j is small: (j, samples drawn from its shuffled stream, good and skipped counts of its
error budget, real samples so far). Workers write it to shared memory (`record`) before handing the batch
over; the main process notes which worker each batch it hands out came from (`note`), so `state` knows, for
the batches consumed, how far each worker got, and which worker's batch comes next. A DataLoader takes its
workers' batches in turn starting with worker 0; a resumed one must start with that next worker, so the
worker slots are rotated for the resumed epoch (torch's worker i reads slot (i + shift) % workers). A resumed worker replays its stream up to the saved draw count
without decoding (reading bytes and shuffling only) and goes on from there; the skipped samples' bookkeeping
is restored rather than recounted.

The state of a rank is a plain dict of ints (see `StreamPosition.state`); each rank loads its own back under the
same world size and number of dataloader workers. A checkpoint is written by one process, so the loader's state
holds every rank's (`gather_ranks`, a collective: every rank saves a checkpoint at the same step anyway).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

PROGRESS_RING = 64  # batches per worker whose position is kept: far more than any prefetching holds back
STATE_VERSION = 1


class StreamPosition:
    """The position bookkeeping of one ShardStream read by a loader with `num_workers` workers."""

    def __init__(self, num_workers: int):
        self.num_workers = max(1, num_workers)
        W = self.num_workers
        # per worker: a ring of (batches made, drawn, good, skipped, real) after each batch, and a resume point
        self.records = torch.zeros((W, PROGRESS_RING, 5), dtype=torch.int64).share_memory_()
        self.resume = torch.zeros((W, 6), dtype=torch.int64).share_memory_()  # (active, *record)
        self.shift = torch.zeros(1, dtype=torch.int64).share_memory_()  # torch worker i reads slot (i + shift) % W
        self.yielded: list[int] = []  # main process: the worker of each batch handed out this epoch
        self.base = [0] * W  # batches each worker had made before this process resumed it
        self.pending: Optional[dict[str, Any]] = None
        self._views = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_views"] = None  # numpy views are rebuilt over the receiving process's shared mapping
        return state

    # -- in the workers ---------------------------------------------------------------------------------
    def record(self, worker: int, made: int, drawn: int, good: int, skipped: int, real: int) -> None:
        if worker < self.num_workers:
            if self._views is None:
                self._views = self.records.numpy()
            self._views[worker, (made - 1) % PROGRESS_RING] = (made, drawn, good, skipped, real)

    def slot(self, torch_worker: int) -> int:
        """The worker slot (of the plan) that torch's worker `torch_worker` reads in this epoch."""
        return (torch_worker + int(self.shift[0])) % self.num_workers

    def resume_for(self, worker: int) -> Optional[tuple[int, ...]]:
        if worker < self.num_workers and int(self.resume[worker, 0]):
            return tuple(int(v) for v in self.resume[worker, 1:])
        return None

    # -- in the main process ----------------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Called by the loader before each pass: apply a loaded state to the epoch it belongs to."""
        self.yielded = []
        self.base = [0] * self.num_workers
        self.resume.zero_()
        self.shift.zero_()
        pending, self.pending = self.pending, None
        if pending is None or pending["epoch"] != epoch:
            return
        self.shift[0] = pending["next_worker"]
        for w, rec in enumerate(pending["workers"]):
            if rec[0] > 0:
                self.resume[w] = torch.tensor([1, *rec])
                self.records[w, (rec[0] - 1) % PROGRESS_RING] = torch.tensor(rec)
                self.base[w] = rec[0]

    def note(self, torch_worker: int) -> None:
        self.yielded.append(self.slot(torch_worker))

    def handed_out(self) -> tuple[int, int]:
        """(batches of this epoch read before this process resumed it, batches handed out this epoch in all)."""
        before = sum(self.base)
        return before, before + len(self.yielded)

    def state(self, epoch: int, rank: int, world_size: int, batches_done: Optional[int] = None) -> dict[str, Any]:
        """The position after `batches_done` batches of the epoch (counting those read before a resume, as a
        resumed trainer's batch counter does); default: every batch handed out."""
        before = self.handed_out()[0]  # batches of this epoch read by the run whose state this one resumed
        k = len(self.yielded) if batches_done is None else int(batches_done) - before
        if not 0 <= k <= len(self.yielded):
            raise ValueError(
                f"batches_done={batches_done}: the loader handed out {before + len(self.yielded)} batches this epoch"
                + (f", {before} of them before it resumed" if before else "")
            )
        workers = []
        for w in range(self.num_workers):
            made = self.base[w] + self.yielded[:k].count(w)
            rec = self.records[w, (made - 1) % PROGRESS_RING].tolist() if made else [0] * 5
            if rec[0] != made:
                raise RuntimeError(
                    f"the position of worker {w} after its batch {made} is no longer held (it ran more than "
                    f"{PROGRESS_RING} batches ahead); take the state closer to the batches consumed"
                )
            workers.append(rec)
        next_worker = (self.yielded[k - 1] + 1) % self.num_workers if k else int(self.shift[0])
        return {
            "version": STATE_VERSION, "epoch": int(epoch), "batches": sum(r[0] for r in workers), "rank": rank,
            "world_size": world_size, "num_workers": self.num_workers, "next_worker": next_worker, "workers": workers,
        }

    def epoch_start(self, epoch: int, rank: int, world_size: int) -> dict[str, Any]:
        """The state of an epoch not begun yet: loading it reads that epoch whole."""
        return {
            "version": STATE_VERSION, "epoch": int(epoch), "batches": 0, "rank": rank, "world_size": world_size,
            "num_workers": self.num_workers, "next_worker": 0, "workers": [[0] * 5 for _ in range(self.num_workers)],
        }

    def load(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown stream state version {state.get('version')!r}")
        saved = (state["rank"], state["world_size"], state["num_workers"])
        if saved != (rank, world_size, self.num_workers):
            raise ValueError(
                f"the stream state was saved by rank {saved[0]} of {saved[1]} with {saved[2]} dataloader worker(s); "
                f"this is rank {rank} of {world_size} with {self.num_workers}: resume with the same world size and "
                "num_workers (each rank loads its own state)"
            )
        self.pending = state


def gather_ranks(own: dict[str, Any], world_size: int) -> list[Optional[dict[str, Any]]]:
    """Every rank's state, indexed by rank: gathered over the default process group (every rank must call this at
    the same time), or only this rank's (the others None) when there is no process group of that size."""
    if world_size == 1:
        return [own]
    gathered: list[Optional[dict[str, Any]]] = [own]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, own)
    states: list[Optional[dict[str, Any]]] = [None] * world_size
    for state in gathered:
        if state is not None:
            states[state["rank"]] = state  # by the stream's own rank, whatever the process group's numbering
    return states
