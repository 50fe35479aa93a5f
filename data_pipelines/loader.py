"""The DataLoader of the stream: one epoch per pass, batches counted so that a checkpoint can hold the
stream's position, and the workers told where a resumed epoch starts.

`ShardStream` (streaming.py) plans and reads the batches; `StreamLoader` hands them out, tracks how many each rank
has consumed, and saves/restores that position (state_dict / load_state_dict, gathered over ranks).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader
from torch.utils.data.dataloader import (
    _InfiniteConstantSampler,
    _MultiProcessingDataLoaderIter,
    _SingleProcessDataLoaderIter,
)

from .position import STATE_VERSION, StreamPosition, gather_ranks
from .streaming import ShardStream

log = logging.getLogger(__name__)



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


class _NotingSingleProcessIter(_SingleProcessDataLoaderIter):
    def _next_data(self):
        data = super()._next_data()
        self._dataset._position.note(0)
        return data


class _NotingMultiProcessingIter(_MultiProcessingDataLoaderIter):
    """Also holds a pass's batch requests back until `start()`: the workers exist (forked when the loader is
    iterated, as for any DataLoader) but read nothing before the pass's epoch and position are in shared memory."""

    def _reset(self, loader, first_iter=False):
        self._held: Optional[int] = 0  # requests held back; None once the pass has started
        super()._reset(loader, first_iter)

    def _try_put_index(self):
        if self._held is not None:
            self._held += 1
            return
        super()._try_put_index()

    def start(self) -> None:
        held, self._held = self._held or 0, None
        for _ in range(held):
            super()._try_put_index()

    def _process_data(self, data, worker_idx):
        data = super()._process_data(data, worker_idx)  # re-raises a worker's exception
        self._dataset._position.note(worker_idx)
        return data


class _Pass(Iterator):
    """One pass over a StreamLoader, whose epoch is named at its first batch rather than at `iter()`. Lightning makes
    the training iterator when it sets up the data and names the epoch (`sampler.set_epoch`) only afterwards; a fit
    resumed from an epoch-end checkpoint reads from that first iterator, and its epoch is the one after the
    checkpoint's. The DataLoader iterator (and its workers) is made at `iter()`; it reads nothing until started."""

    def __init__(self, loader: "StreamLoader", it: Iterator):
        self._loader: Optional[StreamLoader] = loader
        self._it: Optional[Iterator] = it

    def __next__(self):
        if self._it is None:
            raise StopIteration
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader._begin_pass()
            if isinstance(self._it, _NotingMultiProcessingIter):
                self._it.start()
        return next(self._it)

    def __getstate__(self) -> dict:
        return {"_loader": None, "_it": None}  # a DataLoader iterator cannot be pickled (nor can it be copied)


class StreamLoader(DataLoader):
    """DataLoader for a ShardStream: batches come from the workers whole (batch_size=None).

    Each new pass over the loader starts the next epoch unless `set_epoch(e)` named it first (Lightning
    does, through `loader.sampler.set_epoch`); the epoch is read at the pass's first batch and reaches persistent
    workers through shared memory.

    The loader is resumable: `state_dict()` is the position of every rank's stream in its epoch (plain ints, a
    collective under torch.distributed), `load_state_dict()` makes the next pass read the rest of that epoch.
    (Lightning saves a training loader's state in its loop state, but restores it only when the loader is made
    after the checkpoint is loaded, and a module whose configure_optimizers reads `estimated_stepping_batches`
    makes it before; so the datamodules save and restore it themselves.)

    Args:
        batches_done: how many of the epoch's batches the consumer has used, asked when the state is saved
            (a trainer fetches ahead of its step); None, or no callable: every batch handed out.
        epoch: the consumer's current epoch, asked when a pass begins; when it answers it overrides `set_epoch`
            (Lightning's sampler epoch runs one ahead of its own after resuming an iteration-based fit from an
            epoch-end checkpoint).
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: Optional[int] = 2,
        batches_done: Optional[Callable[[], Optional[int]]] = None,
        epoch: Optional[Callable[[], Optional[int]]] = None,
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
        self._next_epoch: Optional[int] = None  # named by set_epoch (or load_state_dict) for the next pass
        self._pass_epoch: Optional[int] = None  # the epoch of the pass begun last
        self._batches_done, self._consumer_epoch = batches_done, epoch
        self._loaded: Optional[dict[str, Any]] = None  # a state given to load_state_dict, applied when its pass begins
        dataset._position = StreamPosition(num_workers)  # before any worker starts: shared memory

    def _get_iterator(self):
        # DataLoader's own choice of iterator, in subclasses that note which worker each batch came from
        if self.num_workers == 0:
            return _NotingSingleProcessIter(self)
        self.check_worker_number_rationality()
        return _NotingMultiProcessingIter(self)

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator:
        return _Pass(self, super().__iter__())

    def _upcoming_epoch(self) -> Optional[int]:
        """The epoch a pass begun now would read, when something names it (the consumer, or set_epoch)."""
        epoch = self._consumer_epoch() if self._consumer_epoch is not None else None
        return epoch if epoch is not None else self._next_epoch

    def _begin_pass(self) -> None:
        epoch = self._upcoming_epoch()
        if epoch is None:
            epoch = self.dataset.epoch + (1 if self._pass_epoch is not None else 0)
        self.dataset.set_epoch(epoch)
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded["epoch"] == epoch:
            self.dataset.load_state_dict(self._own(loaded))  # checked here: a state of another epoch is moot
        self.dataset._position.start_epoch(epoch)  # before any worker reads: shared memory
        self._next_epoch, self._pass_epoch = None, epoch

    # -- position ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where every rank stands in its epoch: {"version", "epoch", "world_size", "ranks": [each rank's
        `ShardStream.state_dict`]}, plain types only. Under torch.distributed every rank must call it at the same
        time (as every rank saves a checkpoint together)."""
        ds, position = self.dataset, self.dataset._position
        upcoming = self._upcoming_epoch()
        if self._loaded is not None and upcoming in (None, self._loaded["epoch"]):
            return self._loaded  # loaded and not read from yet: still where the loaded state was
        if upcoming is not None and upcoming != self._pass_epoch:  # an epoch named and not begun: its start
            own = position.epoch_start(upcoming, ds.rank, ds.world_size)
        else:
            own = ds.state_dict(self._consumed(position))
        return {"version": STATE_VERSION, "epoch": own["epoch"], "world_size": ds.world_size,
                "ranks": gather_ranks(own, ds.world_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at `state` (from `state_dict`): if the next pass is over the saved epoch (Lightning names it with
        `set_epoch`; without, it is the saved one) it reads the rest of that epoch, each rank from its own
        position; a pass over another epoch (the saved one was finished) ignores the state."""
        if state.get("version") != STATE_VERSION or "ranks" not in state:
            raise ValueError(f"not a StreamLoader state (version {state.get('version')!r}): {sorted(state)}")
        self._loaded = state
        self._next_epoch = int(state["epoch"])

    def _consumed(self, position: StreamPosition) -> Optional[int]:
        """The consumer's count of the epoch's batches used, if it keeps one and it fits what was handed out."""
        done = self._batches_done() if self._batches_done is not None else None
        before, handed = position.handed_out()
        if done is not None and not before <= done <= handed:
            # e.g. a fit resumed mid-epoch from a checkpoint without the stream's position: its batch counter
            # started past the batches the stream, reading from the epoch's start, has handed out
            log.warning("the trainer counts %d batches done in this epoch, the stream handed out %d (%d before it "
                        "resumed): saving the position after the batches handed out", done, handed, before)
            return None
        return done

    def _own(self, state: dict[str, Any]) -> dict[str, Any]:
        ds, ranks = self.dataset, state["ranks"]
        if len(ranks) != ds.world_size:
            raise ValueError(
                f"the checkpoint was saved mid-epoch by {len(ranks)} process(es) and this run has {ds.world_size}: "
                "resume it with the same number of processes and dataloader workers, or resume from a checkpoint "
                "taken at an epoch end"
            )
        if ranks[ds.rank] is None:
            raise ValueError(f"the checkpoint holds no stream position for rank {ds.rank} (saved without a process "
                             "group)")
        return ranks[ds.rank]
