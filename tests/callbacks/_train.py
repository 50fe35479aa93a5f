"""A real training process for the fault-injection tests: `python -m tests.callbacks._train --root DIR ...`.

Runs TinyClassifier with every run guard (AtomicCheckpointIO, ModelCheckpoint, NonFiniteGuard, RequireProgress,
InterruptCheckpoint), as the CLI does. Under torchrun it runs DDP on gloo. Each rank writes
`<root>/result-<rank>.json` (global step reached, exception type and message) whatever happens; once training
reaches `--ready-step`, rank 0 creates `<root>/ready` so that a test knows when to send its signal.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.plugins.environments import SLURMEnvironment

from tests.callbacks._tiny import TinyClassifier, TinyDataModule, trainer_kwargs
from vit_experiments.callbacks.checkpointing import AtomicCheckpointIO, ModelCheckpoint
from vit_experiments.callbacks.interruption import InterruptCheckpoint
from vit_experiments.callbacks.run_guard import NonFiniteGuard, RequireProgress


class Ready(pl.Callback):
    def __init__(self, root: Path, step: int):
        self.root, self.step = root, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.is_global_zero and trainer.global_step >= self.step and not (self.root / "ready").exists():
            (self.root / "ready").write_text(str(trainer.global_step))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--nan-steps", type=int, nargs="*", default=())
    p.add_argument("--nan-rank", type=int, default=None)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--ready-step", type=int, default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--slurm", action="store_true", help="run under SLURMEnvironment(auto_requeue=True)")
    p.add_argument("--ckpt-path", default=None)
    a = p.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    callbacks = [
        NonFiniteGuard(), RequireProgress(),
        InterruptCheckpoint(resume_command=f"python -m tests.callbacks._train --root {a.root}"),
        ModelCheckpoint(dirpath=a.root / "ckpt", monitor="val/score", mode="max"),
    ]
    if a.ready_step is not None:
        callbacks.append(Ready(a.root, a.ready_step))
    plugins = [AtomicCheckpointIO()] + ([SLURMEnvironment(auto_requeue=True)] if a.slurm else [])
    kw = trainer_kwargs(a.root, devices=world, strategy="ddp" if world > 1 else "auto")
    trainer = pl.Trainer(max_epochs=a.max_epochs, callbacks=callbacks, plugins=plugins, **kw)
    model = TinyClassifier(nan_steps=a.nan_steps, nan_rank=a.nan_rank, step_sleep=a.step_sleep)
    result = {"exception": None, "message": None}
    try:
        trainer.fit(model, datamodule=TinyDataModule(workers=a.workers), ckpt_path=a.ckpt_path)
    except BaseException as err:
        result.update(exception=type(err).__name__, message=str(err))
        raise
    finally:
        result["global_step"] = trainer.global_step
        result["steps_run"] = [s for s, _ in model.losses]
        (a.root / f"result-{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
