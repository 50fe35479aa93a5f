"""Exact mid-epoch resume of the stream (issue 14): read k batches, save the stream's state, build a fresh stream
and loader, load the state, read the rest: the batches (labels, and pixels: augmentation too) are those of an
uninterrupted epoch, in the same order, with 0 and 2 dataloader workers."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.samples import ImageLabelDecoder
from data_pipelines.streaming import ShardStream, StreamLoader

from .conftest import jpeg, write_tar

SIZES = [23, 17, 31, 9, 20, 12]  # 112 samples


def _corpus(tmp_path):
    """Shards whose images differ (so augmentation shows), three of them corrupt (skips and the refill)."""
    from data_pipelines.metadata import write_sizes

    index, table = 0, {}
    for s, n in enumerate(SIZES):
        samples = [{"__key__": f"k{index + i:05d}", "jpg": jpeg(index + i, 24), "cls": str(index + i).encode()}
                   for i in range(n)]
        if s in (1, 4):
            samples[3]["jpg"] = b"corrupt"
        write_tar(tmp_path / f"train-{s:06d}.tar", samples)
        table[f"train-{s:06d}.tar"] = n
        index += n
    write_sizes(tmp_path, table)
    return str(tmp_path / "train-{000000..000005}.tar")


def _loader(pattern, workers, **kw):
    ds = ShardStream(pattern, ImageLabelDecoder(16, crop_scale=(0.3, 1.0)), batch_size=5, train=True, seed=3,
                     shuffle_buffer=16, max_error_rate=0.1, **kw)
    return ds, StreamLoader(ds, num_workers=workers, persistent_workers=workers > 0)


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop_after", [0, 1, 6, 9, 11])
def test_resumed_epoch_yields_exactly_the_remaining_batches(tmp_path, workers, stop_after):
    pattern = _corpus(tmp_path)
    ds, loader = _loader(pattern, workers, rank=1, world_size=2)
    loader.set_epoch(2)
    full = list(loader)  # the uninterrupted epoch: 112 // (5 * 2) = 11 batches on each rank
    assert len(full) == 11

    ds, loader = _loader(pattern, workers, rank=1, world_size=2)
    loader.set_epoch(2)
    it, head = iter(loader), []
    for _ in range(stop_after):
        head.append(next(it))
    state = ds.state_dict()
    assert state["epoch"] == 2 and state["batches"] == stop_after and state["rank"] == 1
    del it, loader

    ds2, loader2 = _loader(pattern, workers, rank=1, world_size=2)
    ds2.load_state_dict(state)
    tail = list(loader2)
    _same(head + tail, full)
    assert ds2.state_dict()["batches"] == 11  # and the resumed stream's own state goes on from there
    loader2.set_epoch(3)
    assert len(list(loader2)) == 11  # the next epoch is a whole one again


def test_state_with_fewer_batches_done_than_handed_out(tmp_path):
    """Lightning fetches a batch ahead of the step: the state can be taken for the batches actually used."""
    pattern = _corpus(tmp_path)
    full = list(_loader(pattern, 2)[1])
    ds, loader = _loader(pattern, 2)
    it = iter(loader)
    head = [next(it) for _ in range(8)]
    state = ds.state_dict(batches_done=7)
    ds2, loader2 = _loader(pattern, 2)
    ds2.load_state_dict(state)
    _same(head[:7] + list(loader2), full)
    with pytest.raises(ValueError, match="batches_done"):
        ds.state_dict(batches_done=9)


def test_state_refuses_another_world_or_worker_count(tmp_path):
    pattern = _corpus(tmp_path)
    ds, loader = _loader(pattern, 2)
    next(iter(loader))
    state = ds.state_dict()
    with pytest.raises(ValueError, match="same world size and num_workers"):
        _loader(pattern, 0)[0].load_state_dict(state)
    with pytest.raises(RuntimeError, match="StreamLoader"):
        ShardStream(pattern, ImageLabelDecoder(16), batch_size=5, train=True).state_dict()
