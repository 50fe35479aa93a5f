"""Helpers of the feature-cached accumulation tests (tests/tasks/test_contrastive_accumulation.py, one process;
tests/distributed/test_contrastive_accum_ddp.py, 2 gloo processes): data whose optimizer steps hold the same pairs
however they are split into micro-batches and processes, a callback that records what each optimizer step did,
and the torchrun entry point (the one of tests.distributed._scaling, which runs `vitx` jobs one after the other).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed._scaling JOBS.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tests.distributed._scaling import _RankBatches
from tests.models.test_clip import captions

TINY_CLIP = {
    "embed_dim": 16,
    "vision": {"variant": None, "image_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2,
               "num_classes": 0, "pre_norm": True, "patch_bias": False},
    "text": {"vocab_size": 50, "context_length": 12, "width": 32, "depth": 2, "num_heads": 2},
}


class SplitBatchData(L.LightningDataModule):
    """`steps` fixed sets of `pairs` random (uint8 image, caption ids) pairs, the same every epoch, each set split
    into `split` consecutive micro-batches and each micro-batch into the processes' rows (rank r of W takes the
    r-th W-th). With split = k, one optimizer step of k-batch accumulation on W processes sees exactly the pairs
    of one batch of the unsplit data on one process.

    Args:
        split: the micro-batches of a set; a fit accumulating over `split` batches steps once per set.
    """

    def __init__(self, pairs: int = 16, steps: int = 2, split: int = 1, image_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.pairs, self.steps, self.split, self.image_size, self.seed = pairs, steps, split, image_size, seed

    @property
    def batch_size(self) -> int:
        """Pairs per process per batch (what a real datamodule's batch_size is)."""
        return self.pairs // self.split // (self.trainer.world_size if self.trainer else 1)

    def _loader(self, offset: int) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if self.pairs % (self.split * world):
            raise ValueError(f"{self.pairs} pairs do not split into {self.split} micro-batches x {world} processes")
        out = []
        for i in range(self.steps):
            g = torch.Generator().manual_seed(self.seed + offset + i)
            images = torch.randint(0, 256, (self.pairs, 3, self.image_size, self.image_size), generator=g,
                                   dtype=torch.uint8)  # (P, 3, H, W)
            ids = captions(self.pairs, seed=self.seed + offset + i)  # (P, L)
            micro = self.pairs // self.split
            for j in range(self.split):
                rows = slice(j * micro + rank * micro // world, j * micro + (rank + 1) * micro // world)
                out.append((images[rows], ids[rows], torch.ones(micro // world, dtype=torch.bool)))
        return DataLoader(_RankBatches(out), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1000)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()  # FSDP2: DTensor


class RecordSteps(L.Callback):
    """After every optimizer step (seen at the batch that made it), on every process: the whole batch's logged
    loss, `train/contrastive_batch`, the learning rate, every parameter's gradient (as the optimizer used it:
    averaged over processes, clipped) and value. Under DDP, also how many gradient buckets DDP all-reduced for the
    step (a communication hook counts them). torch.save'd to `path` by global rank 0 at the end of training."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.steps: list[dict[str, Any]] = []
        self.allreduces = 0
        self._seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen = trainer.global_step  # a resumed run starts at its checkpoint's step
        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting(state, bucket):
                self.allreduces += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, counting)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._seen:
            return  # accumulating: no step at this batch
        self._seen = trainer.global_step
        metrics = trainer.callback_metrics
        self.steps.append({
            "step": trainer.global_step,
            "loss": float(metrics["train/loss"]),
            "contrastive_batch": float(metrics["train/contrastive_batch"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "allreduces": self.allreduces,
            "grads": {n: _full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None},
            "params": {n: _full(p) for n, p in pl_module.named_parameters()},
        })
        self.allreduces = 0

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            torch.save(self.steps, Path(self.path))


class RaiseTemperature(L.Callback):
    """A fault injected into the temperature's gradient (minus `by` in every backward that reaches it), so that
    descent raises the logit scale above its ceiling and the clamp after each step has work to do."""

    def __init__(self, by: float = 1.0) -> None:
        self.by = by

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.model.logit_scale.register_hook(lambda grad: grad - self.by)


def experiment(tmp: Path, name: str, split: int, pairs: int = 16, steps: int = 2, epochs: int = 1,
               clip: dict | None = None, trainer: dict | None = None, callbacks: tuple = ()) -> dict:
    """A tiny CLIP experiment (the shipped ContrastivePretraining) on SplitBatchData that records its steps in
    tmp/<name>.pt; a dict to write as YAML and give to `vitx fit --config`."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": False, "enable_checkpointing": False, "default_root_dir": str(tmp / "root"),
            "callbacks": [{"class_path": "tests.distributed._contrastive_accum.RecordSteps",
                           "init_args": {"path": str(tmp / f"{name}.pt")}}, *callbacks],
            **(trainer or {}),
        },
        "model": {
            "class_path": "vit_experiments.tasks.contrastive.ContrastivePretraining",
            "init_args": {"clip": clip or TINY_CLIP, "optim": {"lr": 1e-3, "warmup_steps": 2}},
        },
        "analysis": {"enabled": False},  # vitx's attention analysis of every run: not what is tested, and slow
        "data": {"class_path": "tests.distributed._contrastive_accum.SplitBatchData",
                 "init_args": {"pairs": pairs, "steps": steps, "split": split}},
    }


def steps_of(path: Path) -> list[dict[str, Any]]:
    return torch.load(path, weights_only=True)


