"""A tiny LightningModule and data for the run-guard callbacks' tests: a linear classifier on 4 features.

Faults are injected by arguments, not by monkeypatching the trainer: `nan_steps` makes the loss NaN at those
global steps (on `nan_rank` only, or on every rank), `metric` chooses how the logged `val/score` moves, and
`step_sleep` slows every step so that a signal can land mid-training.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset


class TinyClassifier(pl.LightningModule):
    def __init__(
        self,
        nan_steps: Sequence[int] = (),
        nan_rank: Optional[int] = None,
        metric: str = "worse",
        step_sleep: float = 0.0,
        lr: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.hparams.nan_steps = tuple(nan_steps)  # plain types only: the checkpoint loads with weights_only
        self.net = torch.nn.Linear(4, 3)
        self.losses: list[tuple[int, float]] = []  # (global step, loss) as training saw them

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        hp = self.hparams
        if self.global_step in hp.nan_steps and hp.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        self.losses.append((self.global_step, float(loss.detach())))
        if hp.step_sleep:
            time.sleep(hp.step_sleep)
        return loss

    def validation_step(self, batch, batch_idx):
        # a score that gets worse every epoch (mode="max"): after epoch 0 no top-1 save happens
        score = -float(self.current_epoch) if self.hparams.metric == "worse" else float(self.current_epoch)
        self.log("val/score", score, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def tiny_data(n: int = 32, batch_size: int = 8, seed: int = 0, workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())
    return DataLoader(data, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0)


class EmptyStream(IterableDataset):
    """A stream that yields nothing, as shards at a dead URL or zero-byte tars do (no length known)."""

    def __iter__(self):
        return iter(())


class TinyDataModule(pl.LightningDataModule):
    def __init__(self, train_shards: str = "shards/train-{000000..000003}.tar", empty: bool = False, workers: int = 0):
        super().__init__()
        self.train_shards, self.empty, self.workers = train_shards, empty, workers

    def train_dataloader(self):
        return DataLoader(EmptyStream(), batch_size=8) if self.empty else tiny_data(workers=self.workers)

    def val_dataloader(self):
        return tiny_data(16, seed=1)


def trainer_kwargs(tmp_path, **overrides) -> dict:
    kw = dict(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    return {**kw, **overrides}
