"""Helpers of test_scaling.py: a datamodule whose global batch is the same whatever the number of processes,
a callback that records the loss of the global batch at every step, and the entry point that runs several
`vitx` commands in one set of processes started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed._scaling JOBS.json

JOBS.json is a list of argument lists for vit_experiments.cli.main, run one after the other (the process group
is created once and reused, which saves starting the processes for every run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from tests.models.test_clip import captions


class _RankBatches(IterableDataset):
    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class GlobalBatchData(L.LightningDataModule):
    """`batches` fixed global batches of `global_batch` random uint8 images (and labels, or caption ids), the
    same every epoch; a process of rank r among W gets rows [r B / W, (r + 1) B / W) of each. So one process and
    W processes see the same global batches, and a resumed run sees what the uninterrupted one saw.

    Args:
        captions: yield (images, caption ids, valid) for CLIP instead of (images, labels).
    """

    def __init__(
        self, global_batch: int = 16, batches: int = 2, image_size: int = 16, num_classes: int = 4,
        captions: bool = False, seed: int = 0,
    ) -> None:
        super().__init__()
        self.global_batch, self.batches, self.image_size = global_batch, batches, image_size
        self.num_classes = None if captions else num_classes
        self.captions, self.seed = captions, seed

    def _loader(self, offset: int) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.global_batch % world:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by {world} processes")
        rows = slice(rank * self.global_batch // world, (rank + 1) * self.global_batch // world)
        out = []
        for i in range(self.batches):
            g = torch.Generator().manual_seed(self.seed + offset + i)
            images = torch.randint(0, 256, (self.global_batch, 3, self.image_size, self.image_size), generator=g,
                                   dtype=torch.uint8)
            if self.captions:
                ids = captions(self.global_batch, seed=self.seed + offset + i)
                out.append((images[rows], ids[rows], torch.ones(self.global_batch, dtype=torch.bool)[rows]))
            else:
                labels = torch.randint(0, self.num_classes, (self.global_batch,), generator=g)
                out.append((images[rows], labels[rows]))
        return DataLoader(_RankBatches(out), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1000)


class RecordLosses(L.Callback):
    """Writes {"step": [...], "loss": [...], "lr": [...]} to `path` on global rank 0: the loss of the whole
    global batch (the mean over processes of each process's loss) after every optimizer step."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict[str, list] = {"step": [], "loss": [], "lr": [], "epoch": [], "batch": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().float().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        self.record["step"].append(trainer.global_step)
        self.record["loss"].append(loss.item())
        self.record["lr"].append(trainer.optimizers[0].param_groups[0]["lr"])
        self.record["epoch"].append(trainer.current_epoch)
        self.record["batch"].append(batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps(self.record))


def main(jobs_file: str) -> None:
    from vit_experiments.cli import main as vitx

    torch.set_num_threads(1)
    for argv in json.loads(Path(jobs_file).read_text()):
        vitx(argv)


if __name__ == "__main__":
    main(sys.argv[1])
