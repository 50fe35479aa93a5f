"""A checkpoint, a resume command and a non-zero exit for every way a fit can be stopped.

What Lightning 2.6.6 does on its own, and what this callback adds (issue 14, "Interruption", "Pre-emption"):

- SIGTERM: Lightning's signal connector sets a flag and raises `SIGTERMException` at the next batch boundary,
  but saves nothing, and `SIGTERMException` is a `SystemExit` without a code, so the process exits 0.
  Here the newest state is saved and the exit status is 143 (128 + SIGTERM), as a killed job's would be.
- SIGINT (Ctrl-C): Lightning lets `KeyboardInterrupt` land wherever Python is (mid-step, possibly inside the
  optimiser's update) and exits 1 without a checkpoint. Here a first Ctrl-C only asks to stop: training halts at
  the next batch boundary through Lightning's own SIGTERM path, on every rank at the same step (the request is
  reduced over processes), saves, and exits 130. A second Ctrl-C stops at once, without saving. Forked
  dataloader workers inherit the handler and ignore the signal, so Ctrl-C in a terminal (which signals the
  whole process group) does not kill them under the main process.
- An exception: Lightning calls `on_exception` and re-raises; here the newest state is saved first when it is
  safe to (one process, or an error every process raised at the same step: a non-finite loss, an empty epoch).
- SLURM pre-emption: with `SLURMEnvironment(auto_requeue=True)` (Lightning's default under SLURM) Lightning
  already answers the requeue signal (SIGUSR1) with `hpc_ckpt_<n>.ckpt` in the root directory, written through
  the trainer's CheckpointIO (atomic with AtomicCheckpointIO), and `scontrol requeue`; the SIGTERM that SLURM
  then sends is handled as above. Nothing is added for it.

The checkpoint goes to `last.ckpt` in the first ModelCheckpoint's directory (that file is then the newest state,
and Lightning's `ckpt_path="last"` finds it), through `trainer.save_checkpoint`, so the trainer's CheckpointIO
writes it. The message says how to resume: `<command> --ckpt_path <path>`.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from data_pipelines.distributed import rank_world
from vit_experiments.callbacks.checkpointing import last_checkpoint_path, newest_checkpoint
from vit_experiments.callbacks.run_guard import NonFiniteLossError, NoTrainingProgressError

# exceptions that every process raises at the same step, so that all of them can take part in a save
COORDINATED = (SIGTERMException, NonFiniteLossError, NoTrainingProgressError)


def without_ckpt_path(argv: list[str]) -> list[str]:
    """A command line without its --ckpt_path (the resume command adds the checkpoint to resume)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return args


def default_resume_command() -> str:
    """This process's own command line without its --ckpt_path, e.g. `vitx fit --config conf/vit/pretrain.yaml`."""
    args = without_ckpt_path(sys.argv[1:])
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "vitx"
    if prog.endswith(".py") or prog == "-c":
        prog = f"{os.path.basename(sys.executable)} {sys.argv[0]}"
    return " ".join([prog] + [shlex.quote(a) for a in args])


class InterruptCheckpoint(Callback):
    """On SIGINT, SIGTERM or an exception during fit: save the newest state atomically, say how to resume, exit
    non-zero. See the module docstring for what Lightning already does and what this adds.

    Args:
        dirpath: where `last.ckpt` goes when the trainer has no ModelCheckpoint that saves a last file
            (default `<default_root_dir>/checkpoints`).
        resume_command: the command the message tells the user to run, without `--ckpt_path` (default: this
            process's own command line, minus any --ckpt_path).
        graceful_sigint: handle the first Ctrl-C as a request to stop at the next batch boundary.
    """

    def __init__(self, dirpath: Optional[str] = None, resume_command: Optional[str] = None,
                 graceful_sigint: bool = True) -> None:
        self.dirpath, self.resume_command, self.graceful_sigint = dirpath, resume_command, graceful_sigint
        self.saved_path: Optional[str] = None  # what the last interruption saved, for callers and tests
        self._sigints = 0
        self._stop_reason: Optional[str] = None
        self._pid = os.getpid()
        self._previous_handler: Any = None

    # -- the SIGINT handler ------------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked dataloader worker: the main process decides, and will shut the worker down
        self._sigints += 1
        if self._sigints > 1:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        print("\nvitx: Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once, "
              "without one)", file=sys.stderr, flush=True)

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._sigints, self._stop_reason, self.saved_path, self._pid = 0, None, None, os.getpid()
        if self.graceful_sigint and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._restore_sigint()

    def _poll(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """At a batch boundary: did any process get a Ctrl-C? Then stop every one through Lightning's SIGTERM
        path, which raises at its next safe point (after the step's bookkeeping, or between validation batches)."""
        if not self.graceful_sigint or self._stop_reason:
            return
        asked = self._sigints > 0
        if rank_world()[1] > 1:  # one all-reduce of one number per batch, so that every rank stops together
            flag = torch.tensor([int(asked)], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        if asked:
            self._stop_reason = "SIGINT"
            connector = getattr(trainer, "_signal_connector", None)
            if connector is None or not hasattr(connector, "received_sigterm"):
                raise SIGTERMException(130)  # a Lightning without the connector: stop here instead
            connector.received_sigterm = True

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        self._poll(trainer, pl_module)

    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        self._poll(trainer, pl_module)

    # -- saving ------------------------------------------------------------------------------------------

    def _target(self, trainer: "pl.Trainer") -> str:
        path = last_checkpoint_path(trainer)
        if path is None:
            path = os.path.join(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"), "last.ckpt")
        return path

    def _save(self, trainer: "pl.Trainer", exception: BaseException) -> tuple[Optional[str], Optional[str]]:
        """(path saved, or None; why nothing was saved, or None)."""
        if isinstance(exception, KeyboardInterrupt):
            return None, "stopped at once by a second Ctrl-C"
        if trainer.global_step == 0:
            return None, "nothing was trained yet"
        if rank_world()[1] > 1 and not isinstance(exception, COORDINATED):
            return None, ("the error was not raised on every process at the same step, so they cannot write a "
                          "checkpoint together")
        target = self._target(trainer)
        for cb in trainer.checkpoint_callbacks:  # the saved ModelCheckpoint state then names this file as last
            if isinstance(cb, _LightningModelCheckpoint) and cb.save_last:
                cb.last_model_path = target
                break
        try:
            trainer.save_checkpoint(target, weights_only=False)  # the full state: it is for resuming
        except Exception as err:  # a full disk, or NonFiniteGuard refusing a NaN model: report, keep the original
            return None, f"saving {target} failed: {err}"
        return target, None

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):  # Lightning ignores further Ctrl-C while it shuts down
            self._restore_sigint()
        if trainer.state.fn != TrainerFn.FITTING:
            return  # validate/test/predict have no training state to keep
        if isinstance(exception, SIGTERMException):
            reason = self._stop_reason or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            reason = "a second Ctrl-C"
        else:
            reason = f"{type(exception).__name__}: {str(exception).splitlines()[0] if str(exception) else ''}"
        path, why_not = self._save(trainer, exception)
        self.saved_path = path
        resume_from = path or newest_checkpoint(trainer)
        lines = [f"vitx: training stopped at epoch {trainer.current_epoch}, step {trainer.global_step}, by {reason}"]
        lines.append(f"Saved the newest state to {path}." if path else f"No checkpoint saved: {why_not}.")
        if resume_from:
            lines.append(f"Resume with: {self.resume_command or default_resume_command()} --ckpt_path {resume_from}")
        else:
            lines.append("There is no checkpoint to resume from: the run has to start again.")
        if trainer.is_global_zero:
            print("\n".join(lines), file=sys.stderr, flush=True)
        if isinstance(exception, SIGTERMException) and not exception.code:
            # SystemExit() exits 0: a stopped run must not read as a finished one
            exception.code = 128 + (signal.SIGINT if self._stop_reason == "SIGINT" else signal.SIGTERM)
