"""InterruptCheckpoint in one process: an exception during fit saves the newest state to last.ckpt and says how
to resume; a non-finite stop saves the last good (pre-update) state; validate saves nothing. Signals, SLURM
and 2 processes are in test_faults.py (real training processes)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from tests.callbacks._tiny import TinyClassifier, TinyDataModule, trainer_kwargs
from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO, ModelCheckpoint
from vit_experiments.callbacks.interruption import InterruptCheckpoint, default_resume_command
from vit_experiments.callbacks.run_guard import NonFiniteGuard, NonFiniteLossError


class Crashes(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if self.global_step == 6:
            raise RuntimeError("disk went away")
        return super().training_step(batch, batch_idx)


def trainer(tmp_path, *callbacks, **kw):
    cbs = [InterruptCheckpoint(resume_command="vitx fit --config run.yaml"), *callbacks,
           ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max")]
    return pl.Trainer(max_epochs=3, callbacks=cbs, plugins=[AtomicCheckpointIO()], **trainer_kwargs(tmp_path, **kw))


def test_an_exception_saves_the_newest_state_and_says_how_to_resume(tmp_path, capsys):
    t = trainer(tmp_path)
    with pytest.raises(RuntimeError, match="disk went away"):
        t.fit(Crashes(), datamodule=TinyDataModule())
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6  # newer than the epoch-end save at step 4
    err = capsys.readouterr().err
    assert "training stopped at epoch 1, step 6, by RuntimeError: disk went away" in err
    assert f"Resume with: vitx fit --config run.yaml --ckpt_path {last}" in err

    resumed = trainer(tmp_path)  # and the saved state resumes
    resumed.fit(TinyClassifier(), datamodule=TinyDataModule(), ckpt_path=str(last))
    assert resumed.global_step == 12


def test_a_nonfinite_stop_saves_the_state_before_the_bad_update(tmp_path, capsys):
    model = TinyClassifier(nan_steps=[6])
    with pytest.raises(NonFiniteLossError, match="at step 6"):
        trainer(tmp_path, NonFiniteGuard()).fit(model, datamodule=TinyDataModule())
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    assert "Saved the newest state to" in capsys.readouterr().err


def test_nothing_is_saved_before_the_first_step_or_outside_fit(tmp_path, capsys):
    class EarlyCrash(TinyClassifier):
        def training_step(self, batch, batch_idx):
            raise ValueError("bad batch")

    with pytest.raises(ValueError):
        trainer(tmp_path).fit(EarlyCrash(), datamodule=TinyDataModule())
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()
    err = capsys.readouterr().err
    assert "No checkpoint saved: nothing was trained yet" in err and "the run has to start again" in err


def test_default_resume_command_drops_the_old_ckpt_path(monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/vitx", "fit", "--config", "a b.yaml", "--ckpt_path", "x.ckpt",
                                     "--ckpt_path=y.ckpt", "--trainer.max_steps", "5"])
    assert default_resume_command() == "vitx fit --config 'a b.yaml' --trainer.max_steps 5"
