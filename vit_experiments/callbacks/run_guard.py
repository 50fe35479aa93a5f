"""Callbacks that make a run fail loudly instead of succeeding on nothing: non-finite losses and empty epochs.

Found on the previous main (issue 14): `--model.optim.lr 1e6` trains on NaN from step 1 and exits 0 with all-NaN
`best`/`last` checkpoints, one of them chosen as "best" (finding 3); shards at a dead URL give 10 epochs of 0
steps and exit 0 (finding 4). Both callbacks work for any LightningModule, so the CLI adds them to every run.

- `NonFiniteGuard` stops the run on every rank at the same step when the loss (or a gradient) is not finite,
  before the optimiser applies it, naming the step and the last good checkpoint; or skips up to a given number
  of such steps. It also refuses any checkpoint of a model that holds a non-finite value.
- `RequireProgress` fails an epoch that trained on no batch and a fit that took no optimiser step, naming the
  training data and what to check.

Both decide from values reduced over all processes, so every rank raises at the same point and no collective
is left waiting.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from data_pipelines.distributed import rank_world
from vit_experiments.callbacks.checkpointing import newest_checkpoint

_NO_STEP = 2**62  # "no non-finite value seen" in a min-reduction over steps


def _all_reduce_(t: torch.Tensor, op: "dist.ReduceOp") -> torch.Tensor:
    """In place over every process of the default group (a no-op outside one)."""
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=op)
    return t


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise: finiteness is checked shard by shard
    and the verdicts reduced, with no gather."""
    return t.to_local() if hasattr(t, "to_local") else t


def _has_grad_scaler(trainer: "pl.Trainer") -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


class NonFiniteLossError(RuntimeError):
    """Training met a non-finite loss or gradient; raised on every process at the same step."""


class NonFiniteGuard(Callback):
    """Stop (or skip) a step whose loss or gradients are not finite, on every rank alike.

    The loss is checked in `on_before_backward` and the gradients in `on_before_optimizer_step`, as device-side
    flags; the flag is reduced over processes (one all-reduce of one number) and read on the host in
    `on_before_optimizer_step`, i.e. before the optimiser has applied the step. Then:

    - with `skip_nonfinite_steps` left, the step is skipped: every gradient is set to None, which torch's
      optimisers treat as "no update" (no momentum or weight-decay change either); the learning-rate schedule
      still advances, as it does when AMP's scaler skips a step;
    - otherwise a NonFiniteLossError names the step, the epoch and the newest checkpoint on disk.

    Any checkpoint save first checks that no unchecked non-finite value is pending and that every parameter and
    floating buffer is finite (reduced over processes), and raises instead of writing one that is not: a NaN
    model is never saved as best or last. (Lightning skips callbacks' save hooks for weights-only saves,
    ModelCheckpoint(save_weights_only=True); with the default check_every_n_steps=1 no NaN reaches the weights.)

    Args:
        skip_nonfinite_steps: how many non-finite steps to skip over the whole run (kept in the checkpoint)
            before stopping; 0 stops at the first.
        check_every_n_steps: read the flag every n optimiser steps instead of every step, to spare the
            host-device sync of each read (as costly as AMP's per-step check). With n > 1 up to n - 1 bad
            updates may be applied before the stop (the error names the first bad step) and skipping is not
            possible, so it needs skip_nonfinite_steps == 0. Saves are checked either way.
        check_gradients: also check the gradients (catches an overflow in backward behind a finite loss). Not
            done under fp16 AMP, whose scaler skips steps with non-finite gradients by design.
    """

    def __init__(self, skip_nonfinite_steps: int = 0, check_every_n_steps: int = 1, check_gradients: bool = True):
        if skip_nonfinite_steps < 0 or check_every_n_steps < 1:
            raise ValueError(
                f"need skip_nonfinite_steps >= 0 and check_every_n_steps >= 1, got {skip_nonfinite_steps} and "
                f"{check_every_n_steps}"
            )
        if skip_nonfinite_steps and check_every_n_steps != 1:
            raise ValueError(
                "skipping a non-finite step needs it found before the update: use check_every_n_steps=1 with "
                f"skip_nonfinite_steps={skip_nonfinite_steps}"
            )
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.check_every_n_steps = check_every_n_steps
        self.check_gradients = check_gradients
        self.skipped_steps: list[int] = []
        self._pending: Optional[torch.Tensor] = None  # () int64 on the device: first bad step since the last read

    # -- flags, on the device -----------------------------------------------------------------------------

    def _note(self, bad: torch.Tensor, step: int) -> None:
        at = torch.where(bad, step, _NO_STEP)  # () int64, no host sync
        self._pending = at if self._pending is None else torch.minimum(self._pending, at.to(self._pending.device))

    def _take_pending(self, device: torch.device) -> torch.Tensor:
        pending = self._pending if self._pending is not None else torch.tensor(_NO_STEP, device=device)
        self._pending = None
        return pending.to(device=device, dtype=torch.int64).reshape(1).clone()

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        self._note(~torch.isfinite(loss.detach()).all(), trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        if self.check_gradients and not _has_grad_scaler(trainer):
            grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)  # non-finite iff some entry is
                self._note(~torch.isfinite(norm), trainer.global_step)
        if self.skip_nonfinite_steps or (trainer.global_step + 1) % self.check_every_n_steps == 0:
            self._read(trainer, pl_module, optimizer)

    # -- decisions, on the host ---------------------------------------------------------------------------

    def _read(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        first = int(_all_reduce_(self._take_pending(pl_module.device), dist.ReduceOp.MIN).item())
        if first == _NO_STEP:
            return
        if len(self.skipped_steps) < self.skip_nonfinite_steps:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # torch optimisers leave a parameter without a gradient untouched
            self.skipped_steps.append(trainer.global_step)
            rank_zero_warn(
                f"non-finite loss or gradients at step {trainer.global_step}: step skipped "
                f"({len(self.skipped_steps)} of at most {self.skip_nonfinite_steps})"
            )
            return
        raise NonFiniteLossError(self._message(trainer, first))

    def _message(self, trainer: "pl.Trainer", first: int, saving: bool = False) -> str:
        good = newest_checkpoint(trainer)
        where = f"at step {first}" if first == trainer.global_step else (
            f"first at step {first}; the run has trained on it until step {trainer.global_step}")
        lines = [
            f"non-finite loss or gradients {where} (epoch {trainer.current_epoch})"
            + (": refusing to save a checkpoint of a model with NaN/inf values." if saving else
               ", on every process: the run stops here."),
        ]
        if self.skipped_steps:
            lines.append(f"Skipped before: steps {self.skipped_steps} (limit skip_nonfinite_steps="
                         f"{self.skip_nonfinite_steps}).")
        lines.append(f"Last good checkpoint: {good}; resume from it with --ckpt_path {good}" if good else
                     "No checkpoint was saved before it.")
        lines.append("Lower the learning rate, lengthen the warm-up or clip gradients; or let the run skip a few "
                     "such steps (NonFiniteGuard skip_nonfinite_steps).")
        return "\n".join(lines)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        # every process takes part in trainer.save_checkpoint (Lightning requires it), so this reduction is safe
        device = pl_module.device
        tensors = [_local(t) for t in pl_module.parameters()]
        tensors += [_local(b) for b in pl_module.buffers() if b.is_floating_point()]
        bad = torch.tensor(False, device=device)
        if tensors:
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(tensors, foreach=True)).to(device)
        at = torch.minimum(self._take_pending(device), torch.where(bad, trainer.global_step, _NO_STEP).reshape(1))
        first = int(_all_reduce_(at, dist.ReduceOp.MIN).item())
        if first != _NO_STEP:
            raise NonFiniteLossError(self._message(trainer, first, saving=True))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": list(self.skipped_steps)}  # the skip budget spans resumes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = list(state_dict.get("skipped_steps", []))


class NoTrainingProgressError(RuntimeError):
    """An epoch trained on no batch, or a whole fit took no optimiser step."""


def describe_training_data(trainer: "pl.Trainer") -> str:
    """What the run was told to train on, for error messages: the datamodule's shard pattern when it has one."""
    dm = trainer.datamodule
    named = [f"{a}={getattr(dm, a)!r}" for a in ("train_shards", "train_urls", "data_dir") if getattr(dm, a, None)]
    if named:
        return f"{type(dm).__name__}({', '.join(named)})"
    return type(dm).__name__ if dm is not None else "the training dataloader"


class RequireProgress(Callback):
    """Fail a run that trained on nothing, so that it can never exit 0.

    At each train-epoch end, an epoch in which some process got no batch raises NoTrainingProgressError (at once,
    not after every remaining epoch); at the end of fit, so does a global step of 0 (an empty dataloader makes
    Lightning skip the epochs altogether). A run resumed after it had already finished is not an error: its
    global step is not 0.
    """

    def __init__(self) -> None:
        self._batches = 0

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._batches = 0

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a run resumed at the end of an epoch re-enters that epoch with its batches already done: Lightning's
        # restored progress counts them, this callback's counter does not
        done = getattr(getattr(trainer.fit_loop.epoch_loop, "batch_progress", None), "current", None)
        batches = max(self._batches, getattr(done, "completed", 0))
        empty = torch.tensor([int(batches == 0)], device=pl_module.device)
        if _all_reduce_(empty, dist.ReduceOp.MAX).item():
            raise NoTrainingProgressError(self._message(trainer, f"epoch {trainer.current_epoch} had no training batch"))

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.global_step == 0:
            raise NoTrainingProgressError(self._message(trainer, "the run took no optimiser step"))

    @staticmethod
    def _message(trainer: "pl.Trainer", what: str) -> str:
        return (
            f"{what} (global step {trainer.global_step}): nothing was trained on {describe_training_data(trainer)}.\n"
            "Check that the shards exist and can be read (vitx data inspect <pattern> --verify), that remote URLs "
            "answer, that the size file beside the shards does not list them as empty, and that an epoch holds at "
            "least one batch per process (batch size x devices x nodes; drop_last; limit_train_batches)."
        )
