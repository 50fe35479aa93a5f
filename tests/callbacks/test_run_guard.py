"""NonFiniteGuard and RequireProgress with real Trainers: a NaN loss injected at a known step stops the run there
(before the update, never saving a NaN model) or is skipped up to a limit; empty training data fails the run.
The 2-process case (only rank 1 sees the NaN) is in test_faults.py."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.callbacks._tiny import TinyClassifier, TinyDataModule, trainer_kwargs
from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO, ModelCheckpoint
from vit_experiments.callbacks.run_guard import (
    NoTrainingProgressError,
    NonFiniteGuard,
    NonFiniteLossError,
    RequireProgress,
)


def run(tmp_path, model, callbacks, max_epochs=2, datamodule=None, ckpt_path=None, **kw):
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                         **trainer_kwargs(tmp_path, **kw))
    trainer.fit(model, datamodule=datamodule or TinyDataModule(), ckpt_path=ckpt_path)
    return trainer


def all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def saved_checkpoints_are_finite(folder) -> list[str]:
    names = []
    for path in sorted(folder.glob("*.ckpt")):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name
        names.append(path.name)
    return names


def test_nan_loss_stops_at_its_step_before_the_update(tmp_path):
    model = TinyClassifier(nan_steps=[5])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(NonFiniteLossError, match=r"(?s)at step 5 \(epoch 1\).*Last good checkpoint: .*last\.ckpt"):
        run(tmp_path, model, [NonFiniteGuard(), ckpt])
    assert [s for s, _ in model.losses][-1] == 5  # step 5 ran its forward pass, and nothing after it
    assert all_finite(model)  # the NaN gradients were never applied
    assert "epoch=0-step=4.ckpt" in saved_checkpoints_are_finite(tmp_path / "ckpt")


def test_nonfinite_steps_are_skipped_up_to_the_limit(tmp_path):
    model = TinyClassifier(nan_steps=[2, 5])
    guard = NonFiniteGuard(skip_nonfinite_steps=2)
    trainer = run(tmp_path, model, [guard, ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=2)
    assert guard.skipped_steps == [2, 5] and trainer.global_step == 8 and all_finite(model)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]  # the budget is saved
    saved_checkpoints_are_finite(tmp_path / "ckpt")

    model = TinyClassifier(nan_steps=[1, 3, 4])
    with pytest.raises(NonFiniteLossError, match=r"(?s)at step 4 .*Skipped before: steps \[1, 3\]"):
        run(tmp_path, model, [NonFiniteGuard(skip_nonfinite_steps=2)])
    assert all_finite(model)


def test_a_skipped_step_leaves_parameters_and_momentum_alone(tmp_path):
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            momentum = [opt.state[p].get("momentum_buffer") for p in pl_module.parameters()]
            seen[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()] + [
                m.clone() for m in momentum if m is not None]

    model = TinyClassifier(nan_steps=[2])
    guard = NonFiniteGuard(skip_nonfinite_steps=1)
    run(tmp_path, model, [guard, Spy()], max_epochs=1)
    assert guard.skipped_steps == [2]
    same = lambda a, b: len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    assert same(seen[2], seen[3])  # the skipped step changed neither the weights nor SGD's momentum
    assert not same(seen[1], seen[2])  # while the steps around it trained


def test_sparse_checks_still_never_save_a_nan_model(tmp_path):
    """check_every_n_steps=4: the NaN of step 1 is applied, but the save at step 2 refuses the NaN weights."""
    model = TinyClassifier(nan_steps=[1])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(NonFiniteLossError, match=r"first at step 1.*refusing to save"):
        run(tmp_path, model, [NonFiniteGuard(check_every_n_steps=4), ckpt])
    assert not all_finite(model)
    assert saved_checkpoints_are_finite(tmp_path / "ckpt") == []


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="check_every_n_steps=1"):
        NonFiniteGuard(skip_nonfinite_steps=3, check_every_n_steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        NonFiniteGuard(skip_nonfinite_steps=-1)


def test_an_epoch_without_batches_fails_and_names_the_data(tmp_path):
    dm = TinyDataModule(train_shards="http://127.0.0.1:9/train-{000..003}.tar", empty=True)
    with pytest.raises(NoTrainingProgressError, match=r"(?s)epoch 0 had no training batch.*127\.0\.0\.1:9.*--verify"):
        run(tmp_path, TinyClassifier(), [RequireProgress()], max_epochs=10, datamodule=dm)


def test_a_fit_with_zero_steps_fails(tmp_path):
    class NoRows(TinyDataModule):
        def train_dataloader(self):  # a sized, empty loader: Lightning skips the epochs altogether
            return DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), batch_size=8)

    with pytest.raises(NoTrainingProgressError, match="no optimiser step"):
        run(tmp_path, TinyClassifier(), [RequireProgress()], max_epochs=3, datamodule=NoRows())


def test_a_finished_run_resumed_is_not_an_error(tmp_path):
    run(tmp_path, TinyClassifier(), [RequireProgress(), ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=1)
    trainer = run(tmp_path, TinyClassifier(), [RequireProgress()], max_epochs=1,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 4


def test_resuming_at_an_epoch_end_is_not_an_empty_epoch(tmp_path):
    """Stopped by SIGTERM in the validation at an epoch's end (Lightning raises between validation batches), the
    saved state re-enters that epoch with every training batch already done: not an empty epoch."""
    from vit_experiments.callbacks.interruption import InterruptCheckpoint

    class TermAtEpochEnd(pl.Callback):
        def on_validation_batch_end(self, trainer, *args):
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, TinyClassifier(), [RequireProgress(), InterruptCheckpoint(), TermAtEpochEnd(), ckpt])
    assert stop.value.code == 143
    trainer = run(tmp_path, TinyClassifier(), [RequireProgress()], max_epochs=2,
                  ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 8
