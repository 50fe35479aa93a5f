"""Programs run by test_data_ddp.py in a subprocess: 2 real processes (gloo, CPU, forked) reading the same
shard set through the streaming layer, once with plain torch.distributed and once under Lightning's DDP.

Every sample's label is its global index, so what each rank saw can be compared exactly. Each rank writes
what it saw to OUT/rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

TRAIN_SIZES = [37, 5, 22, 9, 41, 3, 17, 26]  # 160 samples in very unequal shards
VAL_SIZES = [13, 6, 10]  # 29 samples
BATCH = 4
EPOCHS = 2


def make_data(root: Path) -> tuple[str, str]:
    from tests.data.conftest import make_shards

    return make_shards(root, TRAIN_SIZES, "train"), make_shards(root, VAL_SIZES, "val")


def val_metric_reference() -> float:
    """The single-process value of the validation 'metric' below: share of labels divisible by 3."""
    n = sum(VAL_SIZES)
    return sum(1 for i in range(n) if i % 3 == 0) / n


# ---------------------------------------------------------------------------------------------- plain


def _plain_worker(rank: int, world: int, init_file: str, train: str, val: str, out: str) -> None:
    from data_pipelines.constants import IGNORE_INDEX
    from data_pipelines.samples import ImageLabelDecoder
    from data_pipelines.loader import StreamLoader
    from data_pipelines.streaming import ShardStream

    torch.set_num_threads(1)
    # a timeout turns a hang (ranks with different batch counts at a collective) into an error
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    decoder = ImageLabelDecoder(8, crop_scale=(0.5, 1.0))
    train_ds = ShardStream(train, decoder, batch_size=BATCH, train=True, shuffle_buffer=16)  # rank/world: dist
    loader = StreamLoader(train_ds, num_workers=2, persistent_workers=True)
    record: dict = {"train": [], "val_batches": 0, "len": len(loader)}
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        labels = []
        for _, y in loader:
            token = torch.ones(1)
            dist.all_reduce(token)  # one collective per batch, as DDP's gradient all-reduce
            labels += y.tolist()
        record["train"].append(labels)
    val_loader = StreamLoader(ShardStream(val, decoder, batch_size=BATCH, train=False), num_workers=2)
    totals = torch.zeros(2)
    for _, y in val_loader:
        valid = y != IGNORE_INDEX
        totals += torch.stack([(y[valid] % 3 == 0).sum(), valid.sum()]).float()
        dist.all_reduce(torch.ones(1))
        record["val_batches"] += 1
        record.setdefault("val_labels", []).extend(y[valid].tolist())
    dist.all_reduce(totals)
    record["val_metric"] = (totals[0] / totals[1]).item()
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def plain(out: str) -> None:
    import torch.multiprocessing as mp

    train, val = make_data(Path(out) / "shards")
    mp.start_processes(_plain_worker, args=(2, os.path.join(out, "rendezvous"), train, val, out), nprocs=2,
                       start_method="fork")


# ---------------------------------------------------------------------------------------------- Lightning


def lightning(out: str) -> None:
    import warnings

    import lightning as L
    import torch.nn.functional as F

    from data_pipelines.constants import IGNORE_INDEX
    from data_pipelines.datamodules import ImageLabelDataModule
    from data_pipelines.transforms import normalize

    warnings.filterwarnings("ignore")
    train, val = make_data(Path(out) / "shards")

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 8 * 8, 2)
            self.train_labels: list[list[int]] = []
            self.val_metrics: list[float] = []
            self.val_batches: list[int] = []

        def on_train_epoch_start(self):
            self.train_labels.append([])

        def training_step(self, batch, _):
            x, y = batch
            self.train_labels[-1] += y.tolist()
            logits = self.head(normalize(x).flatten(1))
            return F.cross_entropy(logits, y % 2)

        def on_validation_epoch_start(self):
            self.val_totals = torch.zeros(2)
            self.val_batches.append(0)

        def validation_step(self, batch, _):
            x, y = batch
            valid = y != IGNORE_INDEX  # padding that keeps batch counts equal across ranks
            self.val_totals += torch.stack([(y[valid] % 3 == 0).sum(), valid.sum()]).float()
            self.val_batches[-1] += 1

        def on_validation_epoch_end(self):
            totals = self.trainer.strategy.reduce(self.val_totals, reduce_op="sum")
            self.val_metrics.append((totals[0] / totals[1]).item())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_fit_end(self):
            Path(out, f"rank{self.global_rank}.json").write_text(json.dumps({
                "train": self.train_labels, "val_metrics": self.val_metrics, "val_batches": self.val_batches,
            }))

    dm = ImageLabelDataModule(train_shards=train, val_shards=val, batch_size=BATCH, image_size=8, num_workers=1,
                              shuffle_buffer=16, num_classes=1000, persistent_workers=True)
    trainer = L.Trainer(
        strategy="ddp_fork", accelerator="cpu", devices=2, max_epochs=EPOCHS, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(Recorder(), datamodule=dm)


if __name__ == "__main__":
    {"plain": plain, "lightning": lightning}[sys.argv[1]](sys.argv[2])
