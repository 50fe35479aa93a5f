"""A Lightning callback that times the training steps of a real `vitx fit` run, for the benchmarks that run the
shipped CLI (benchmarks.gpu_check, benchmarks.cpu_threads): added with `--config` of a small overlay that lists it
under `trainer.callbacks+`, so the run is otherwise exactly the shipped experiment.

It adds no host synchronisation inside the timed steps: the device is synchronised once when timing starts and
once when it ends; the loss's finiteness is accumulated on the device and read at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch


def _sync(module: L.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class StepTimer(L.Callback):
    """Time optimiser steps `warmup`..`warmup + steps` and write what was measured to `out` (JSON).

    Args:
        out: where to write {"images_per_s", "step_ms", "steps_timed", "loss", "loss_finite", "peak_mib", ...}.
        warmup: untimed steps first (compilation, allocator warm-up, loader workers starting).
        steps: timed steps; the run is stopped after them (`trainer.should_stop`).
        budget_s: stop the run (timed or not) after this many seconds of training.
    """

    def __init__(self, out: str, warmup: int = 2, steps: int = 10, budget_s: Optional[float] = None) -> None:
        self.out, self.warmup, self.steps, self.budget_s = Path(out), warmup, steps, budget_s
        self.batches = 0
        self.images = 0
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.timed = 0
        self.started = 0.0
        self.finite: Optional[torch.Tensor] = None
        self.last_loss: Optional[torch.Tensor] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batches += 1
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            ok = torch.isfinite(loss.detach()).all()  # on the device: no sync
            self.finite = ok if self.finite is None else self.finite & ok
            self.last_loss = loss.detach()
        if self.batches == self.warmup:
            _sync(pl_module)
            self.t0 = time.perf_counter()
        elif self.t0 is not None and self.t1 is None:
            self.timed += 1
            self.images += len(batch[0])
            if self.timed >= self.steps:
                self._stop_clock(pl_module)
                trainer.should_stop = True
        if self.budget_s is not None and time.perf_counter() - self.started > self.budget_s:
            trainer.should_stop = True

    def _stop_clock(self, pl_module: L.LightningModule) -> None:
        _sync(pl_module)
        self.t1 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.t0 is not None and self.t1 is None and self.timed:
            self._stop_clock(pl_module)
        seconds = (self.t1 - self.t0) if self.t1 is not None else None
        result = {
            "batches": self.batches, "steps_timed": self.timed, "images_timed": self.images,
            "seconds_timed": seconds,
            "images_per_s": self.images / seconds if seconds else None,
            "step_ms": 1e3 * seconds / self.timed if seconds and self.timed else None,
            "loss": float(self.last_loss.float()) if self.last_loss is not None else None,
            "loss_finite": bool(self.finite) if self.finite is not None else None,
            "peak_mib": (torch.cuda.max_memory_allocated(pl_module.device) / 2**20
                         if pl_module.device.type == "cuda" else None),
            "train_seconds": time.perf_counter() - self.started,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=1))


def timer_overlay(path: Path, out: Path, warmup: int, steps: int, budget_s: Optional[float] = None) -> Path:
    """Write an overlay YAML that adds a StepTimer to an experiment's callbacks; returns its path."""
    import yaml

    overlay = {"trainer": {"callbacks+": [{
        "class_path": "benchmarks.gpu_check_timer.StepTimer",
        "init_args": {"out": str(out), "warmup": warmup, "steps": steps, "budget_s": budget_s},
    }]}}
    path.write_text(yaml.safe_dump(overlay))
    return path
