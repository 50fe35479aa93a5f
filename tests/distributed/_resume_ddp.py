"""Helpers of test_resume_ddp.py: a callback that records which samples each rank trains on at every batch, one
that kills the whole job with SIGKILL at a given step, and the entry point that runs several `vitx` commands in
one set of processes started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.distributed._resume_ddp JOBS.json

JOBS.json is a list of argument lists for vit_experiments.cli.main, run one after the other. Batches carry no
sample keys; the test's corpus gives every sample its global index as its label, so a batch's labels name its
samples (the product is unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class RecordSamples(L.Callback):
    """Appends one JSON line per training batch to `<dir>/rank<r>.jsonl`: epoch, batch index, global step after the
    batch, the batch's labels (here: sample indices) and a digest of each image as the model received it (so
    augmentation is compared too). Written line by line, so a SIGKILL loses nothing already trained on."""

    def __init__(self, dir: str) -> None:
        self.dir = dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, labels = batch[0], batch[1]
        record = {
            "epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step,
            "labels": labels.tolist(),
            "pixels": [hashlib.sha1(img.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]
                       for img in images],
        }
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.dir) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class KillAt(L.Callback):
    """At the end of the batch that reaches optimizer step `step`, the whole job dies by SIGKILL, as on a lost node:
    the ranks meet at a barrier (so that each has recorded its batches), then every rank kills its own process
    group (torchrun starts each rank in a session of its own: the rank and its dataloader workers) and rank 0
    kills torchrun, its parent (the test starts torchrun in a session of its own, so its group is torchrun alone)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step < self.step:
            return
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if trainer.is_global_zero:
            parent = os.getppid()
            if os.getpgid(parent) == parent:
                os.killpg(parent, signal.SIGKILL)
            else:
                os.kill(parent, signal.SIGKILL)
        os.killpg(os.getpgrp(), signal.SIGKILL)


def main(jobs_file: str) -> None:
    from vit_experiments.cli import main as vitx

    torch.set_num_threads(1)
    for argv in json.loads(Path(jobs_file).read_text()):
        vitx(argv)


if __name__ == "__main__":
    main(sys.argv[1])
