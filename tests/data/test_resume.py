"""Exact mid-epoch resume of the stream (issue 14): read k batches, save the loader's state, build a fresh stream
and loader, load the state, read the rest: the batches (labels, and pixels: augmentation too) are those of an
uninterrupted epoch, in the same order, with 0 and 2 dataloader workers. Also the loader's state at the edges a
trainer reaches (an epoch named but not begun, a state loaded and not read yet, a consumer that counts its own
batches or runs ahead), and `vitx fit` resumed from an epoch-end checkpoint."""

from __future__ import annotations

import pytest
import torch

from data_pipelines.samples import ImageLabelDecoder
from data_pipelines.loader import StreamLoader
from data_pipelines.streaming import ShardStream

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
    state = loader.state_dict()  # what a checkpoint holds: every rank's position (here only rank 1's is known)
    own = state["ranks"][1]
    assert state["world_size"] == 2 and state["ranks"][0] is None
    assert own["epoch"] == 2 and own["batches"] == stop_after and own["rank"] == 1
    del it, loader

    ds2, loader2 = _loader(pattern, workers, rank=1, world_size=2)
    loader2.load_state_dict(state)
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


# -- the loader's state, as checkpoints hold it ------------------------------------------------------------------


def _epoch(pattern, epoch, workers=2):
    loader = _loader(pattern, workers)[1]
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_state_of_an_epoch_named_but_not_begun_is_its_start(tmp_path):
    """Lightning calls set_epoch at an epoch's start, before its first batch: a checkpoint there is that epoch's
    start (not the end of the previous one, whose batches the loader still remembers)."""
    pattern = _corpus(tmp_path)
    ds, loader = _loader(pattern, 2)
    loader.set_epoch(1)
    list(loader)
    loader.set_epoch(2)
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["ranks"][0]["batches"] == 0
    loader2 = _loader(pattern, 2)[1]
    loader2.load_state_dict(state)
    _same(list(loader2), _epoch(pattern, 2))


def test_loader_made_before_the_epoch_is_named_reads_the_named_epoch(tmp_path):
    """Lightning makes the training iterator before it calls set_epoch, and a fit resumed at an epoch end reads from
    that iterator: the epoch is taken when the pass begins, at its first batch."""
    pattern = _corpus(tmp_path)
    loader = _loader(pattern, 2)[1]
    it = iter(loader)
    loader.set_epoch(4)
    _same(list(it), _epoch(pattern, 4))


def test_a_loaded_state_is_saved_unchanged_until_read_and_moot_for_another_epoch(tmp_path):
    pattern = _corpus(tmp_path)
    ds, loader = _loader(pattern, 2)
    loader.set_epoch(2)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()

    loader2 = _loader(pattern, 2)[1]
    loader2.load_state_dict(state)
    assert loader2.state_dict() == state  # a checkpoint before the first batch after a resume keeps the position
    loader2.set_epoch(2)
    assert loader2.state_dict() == state
    _same(head + list(loader2), _epoch(pattern, 2))

    loader3 = _loader(pattern, 2)[1]
    loader3.load_state_dict(state)
    loader3.set_epoch(3)  # the saved epoch was finished after all (a checkpoint at its end): read the next whole
    _same(list(loader3), _epoch(pattern, 3))


def test_consumer_count_includes_the_batches_before_a_resume(tmp_path):
    """The trainer's batch counter goes on from the resumed batch: the loader's `batches_done` is the epoch's."""
    pattern = _corpus(tmp_path)
    full = _epoch(pattern, 0)
    ds, loader = _loader(pattern, 2)
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()

    count = {"done": None}
    ds2 = ShardStream(pattern, ImageLabelDecoder(16, crop_scale=(0.3, 1.0)), batch_size=5, train=True, seed=3,
                      shuffle_buffer=16, max_error_rate=0.1)
    loader2 = StreamLoader(ds2, num_workers=2, persistent_workers=True, batches_done=lambda: count["done"])
    loader2.load_state_dict(state)
    it2 = iter(loader2)
    middle = [next(it2) for _ in range(4)]  # a trainer that fetched 4 but has used only 3: 4 + 3 of the epoch
    count["done"] = 7
    state2 = loader2.state_dict()
    assert state2["ranks"][0]["batches"] == 7
    loader3 = _loader(pattern, 2)[1]
    loader3.load_state_dict(state2)
    _same(head + middle[:3] + list(loader3), full)


def test_a_consumer_count_beyond_the_batches_handed_out_is_clamped_with_a_warning(tmp_path, caplog):
    """A fit resumed mid-epoch from a checkpoint without the stream's position counts batches the stream did not
    hand out; its next checkpoint must still save (the position after what was handed out), and say so."""
    pattern = _corpus(tmp_path)
    ds = ShardStream(pattern, ImageLabelDecoder(16), batch_size=5, train=True, shuffle_buffer=16, max_error_rate=0.1)
    loader = StreamLoader(ds, num_workers=0, batches_done=lambda: 9)
    it = iter(loader)
    for _ in range(2):
        next(it)
    with caplog.at_level("WARNING", logger="data_pipelines.streaming"):
        state = loader.state_dict()
    assert state["ranks"][0]["batches"] == 2
    assert "counts 9 batches" in caplog.text


def test_a_mid_epoch_state_refuses_another_world_size_when_its_epoch_is_read(tmp_path):
    pattern = _corpus(tmp_path)
    ds, loader = _loader(pattern, 2, rank=1, world_size=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader1 = _loader(pattern, 2)[1]
    loader1.load_state_dict(state)
    with pytest.raises(ValueError, match="same number of processes"):
        next(iter(loader1))
    loader2 = _loader(pattern, 2)[1]
    loader2.load_state_dict(state)
    loader2.set_epoch(1)  # an epoch-end checkpoint resumes on any number of processes
    assert len(list(loader2)) == 22


# -- through `vitx fit`: resumed from a checkpoint taken at an epoch end ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("budget", [["--trainer.max_epochs", "2"], ["--trainer.max_epochs", "-1", "--trainer.max_steps", "32"]],
                         ids=["max_epochs", "max_steps"])
def test_vitx_fit_resumed_at_an_epoch_end_reads_the_next_epoch_as_an_uninterrupted_fit(tmp_path, budget):
    """A checkpoint saved in on_train_epoch_end (no validation here): Lightning makes the resumed fit's training
    iterator before it names the epoch, and under max_steps its sampler epoch runs one ahead of the trainer's;
    the resumed fit still reads the second epoch's samples, order and augmentation (one process, 2 workers; the
    2-process mid-epoch cases are tests/distributed/test_resume_ddp.py)."""
    from tests.distributed.test_resume_ddp import fit_args, records, write_corpus
    from vit_experiments.cli import main

    data = write_corpus(tmp_path / "shards")
    at_epoch_end = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ends"), "filename": "{epoch}", "every_n_epochs": 1,
                                  "save_on_train_epoch_end": True, "save_top_k": -1, "save_last": False}}
    common = [*budget, "--trainer.limit_val_batches", "0", "--data.train_samples", "64"]  # 16 batches an epoch
    main(fit_args(tmp_path, "full", data, 1, [at_epoch_end], *common, devices=1))
    main(fit_args(tmp_path, "resumed", data, 1, [], *common, "--ckpt_path", str(tmp_path / "ends" / "epoch=0.ckpt"),
                  devices=1))
    full, resumed = records(tmp_path, "full", 0), records(tmp_path, "resumed", 0)
    assert len(full) == 32 and [(r["epoch"], r["batch"]) for r in resumed] == [(1, b) for b in range(16)]
    assert [r["labels"] for r in resumed] == [r["labels"] for r in full[16:]]
    assert [r["pixels"] for r in resumed] == [r["pixels"] for r in full[16:]]
    assert full[0]["labels"] != full[16]["labels"]  # epochs differ: the second one is no replay of the first
