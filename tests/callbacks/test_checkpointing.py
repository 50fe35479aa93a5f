"""Checkpoints a full disk cannot truncate (AtomicCheckpointIO) and a `last.ckpt` that is always the newest state
(ModelCheckpoint), each shown with a real Lightning Trainer and an injected fault."""

from __future__ import annotations

import errno
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from tests.callbacks._tiny import TinyClassifier, TinyDataModule, trainer_kwargs
from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO, ModelCheckpoint, newest_checkpoint


def fit(tmp_path, callbacks, max_epochs=1, ckpt_path=None, **kw):
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                         **trainer_kwargs(tmp_path, **kw))
    trainer.fit(TinyClassifier(), datamodule=TinyDataModule(), ckpt_path=ckpt_path)
    return trainer


def half_then_enospc(real_save):
    """torch.save that writes half of the real bytes, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    fit(tmp_path, [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0)], max_epochs=1)
    last = ckpt_dir / "last.ckpt"
    before = last.read_bytes()
    assert torch.load(last, weights_only=True)["epoch"] == 0

    monkeypatch.setattr(torch, "save", half_then_enospc(torch.save))
    with pytest.raises(OSError, match="could not save the checkpoint .*last.ckpt: No space left.*previous checkpoint, intact") as err:
        fit(tmp_path, [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0)], max_epochs=2, ckpt_path=str(last))
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert last.read_bytes() == before  # the final name still holds the whole previous file
    assert torch.load(last, weights_only=True)["epoch"] == 0
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no partial temporary left behind


def test_lightning_default_io_truncates_when_tmp_is_another_disk(tmp_path, monkeypatch):
    """Why the plugin exists: Lightning's IO stages the file in the temporary directory and moves it; across file
    systems the move is a copy into the final name, so a failure mid-copy leaves a truncated checkpoint there."""
    import shutil

    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    target = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, target)

    def move_across_devices(src, dst, *a, **k):  # what shutil.move does when os.rename gets EXDEV
        with open(src, "rb") as s, open(dst, "wb") as d:
            d.write(s.read()[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "move", move_across_devices)
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, target)
    monkeypatch.undo()
    with pytest.raises(Exception):
        torch.load(target, weights_only=True)  # the old checkpoint is gone and the new one is half written

    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000)}, target)
    monkeypatch.setattr(shutil, "move", move_across_devices)  # not used: the rename stays in one directory
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1000)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1000))


def test_atomic_save_keeps_the_usual_permissions_and_loads_weights_only(tmp_path):
    path = tmp_path / "sub" / "x.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(3)}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert torch.equal(io.load_checkpoint(path)["w"], torch.arange(3))

    torch.save({"obj": Opaque()}, path)  # not an allow-listed type: refused unless the file is trusted
    with pytest.raises(Exception, match="[Ww]eights only"):
        io.load_checkpoint(path)
    assert isinstance(AtomicCheckpointIO(trusted=True).load_checkpoint(path)["obj"], Opaque)


class Opaque:
    pass


def test_interrupt_during_a_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, path)

    def interrupted(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["x.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(2))


@pytest.mark.parametrize("save_last", [True, "link"])
def test_last_is_the_newest_state_when_the_metric_gets_worse(tmp_path, save_last):
    """3 epochs of 4 steps whose val/score falls every epoch: Lightning's own ModelCheckpoint leaves last.ckpt at
    epoch 0 (the only top-1 save); this one rewrites it at every validation end."""
    ckpt_dir = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/score", mode="max", save_top_k=1, save_last=save_last)
    trainer = fit(tmp_path, [cb], max_epochs=3)
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, trainer.global_step) == (2, 12)
    assert os.path.basename(cb.best_model_path) == "epoch=0-step=4.ckpt"  # top-k is Lightning's, untouched
    assert torch.load(cb.best_model_path, weights_only=True)["global_step"] == 4
    assert newest_checkpoint(trainer) == str(ckpt_dir / "last.ckpt")

    stock = LightningModelCheckpoint(dirpath=tmp_path / "stock", monitor="val/score", mode="max", save_last=True)
    fit(tmp_path, [stock], max_epochs=3)
    assert torch.load(tmp_path / "stock" / "last.ckpt", weights_only=True)["epoch"] == 0  # the bug, for the record


def test_last_is_written_at_the_end_of_fit_between_validations(tmp_path):
    """max_steps ends the run mid-epoch, after the last validation: last.ckpt still holds the final step."""
    ckpt_dir = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/score", mode="max")
    trainer = fit(tmp_path, [cb], max_epochs=5, max_steps=6)
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == trainer.global_step == 6


@pytest.mark.parametrize(
    "trainer_args, best_epoch", [(dict(val_check_interval=0.5), 0), (dict(check_val_every_n_epoch=2), 1)]
)
def test_last_follows_every_validation_and_every_epoch(tmp_path, trainer_args, best_epoch):
    """Validation twice an epoch, or every other epoch: Lightning saves top-k at validation end there; last is
    still the newest state after 3 epochs, and top-k still saved its first (best) checkpoint."""
    ckpt_dir = tmp_path / "ckpt"
    cb = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/score", mode="max")
    trainer = fit(tmp_path, [cb], max_epochs=3, **trainer_args)
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == trainer.global_step == 12
    assert cb.best_model_path and torch.load(cb.best_model_path, weights_only=True)["epoch"] == best_epoch
