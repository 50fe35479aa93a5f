"""Checkpoints that a crash cannot corrupt and a stalled metric cannot make stale.

Two holes in Lightning 2.6.6 that lose a long run's work (issue 14, findings 12 and 2):

- `TorchCheckpointIO` writes the whole file into the system temporary directory and then `shutil.move`s it;
  when /tmp is another file system (the usual case beside a data disk) the move is a copy into the final name,
  so a full disk or a kill during the copy leaves a truncated checkpoint under that name. `AtomicCheckpointIO`
  writes to a temporary name in the destination directory, fsyncs it and `os.replace`s it over the final name:
  a reader sees the old file or the new one, never part of one.
- `ModelCheckpoint(save_last=True, monitor=...)` writes `last.ckpt` only at a step where a top-k checkpoint was
  saved: once the monitored metric stops improving, `last.ckpt` stays at the best epoch and a run resumed "from
  last" silently loses the epochs since. This module's `ModelCheckpoint` rewrites it at every epoch or
  validation end and at the end of fit, whether or not a top-k save happened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

# the process's umask, read once (reading it means setting it): mkstemp creates files 0600, a checkpoint should
# get the permissions an ordinary open() would give it
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _local_path(path: _PATH) -> Optional[str]:
    """The file-system path of a local destination, or None for a remote URL (s3://, gs://, ...)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return text[len("file://") :]
    return None if "://" in text else text


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable: without it a power cut can bring back the old directory entry."""
    with contextlib.suppress(OSError):  # some file systems (and Windows) refuse to open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save/torch.load checkpoint IO, with saves that are all-or-nothing on local disks.

    A save goes to `.<name>.<random>.tmp` beside the destination (same file system, so the final rename is
    atomic; the name does not end in `.ckpt`, so nothing that globs checkpoints picks it up), is flushed and
    fsynced, then renamed over the destination. If writing fails (ENOSPC, EIO, an interrupt) the temporary
    file is removed, the file already under the final name is left untouched, and the error says so.
    Remote destinations (s3://, gs://, ...) go through Lightning's own path: object stores publish an upload
    only once it is complete.

    Args:
        trusted: loads that do not say otherwise use `weights_only=not trusted`. Lightning's default loads
            http(s) checkpoints with weights_only=False, which runs any pickle the server sends (issue 14,
            finding 1); False here makes every load through this plugin safe unless the caller asks.
    """

    def __init__(self, trusted: bool = False) -> None:
        super().__init__()
        self.trusted = trusted

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        local = _local_path(path)
        if local is None or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote, or an error it explains
        directory = os.path.dirname(os.path.abspath(local))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(local)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, local)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                reason = os.strerror(err.errno) if err.errno else str(err)
                hint = " Free some space on that disk, or point the checkpoints elsewhere." if err.errno in (
                    errno.ENOSPC, errno.EDQUOT) else ""
                raise OSError(
                    err.errno,
                    f"could not save the checkpoint {local}: {reason}. Nothing was written under that name: the "
                    f"file there, if any, is the previous checkpoint, intact.{hint}",
                ) from err
            raise
        _fsync_directory(directory)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if weights_only is None:
            weights_only = not self.trusted
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint (same arguments), except that `last.ckpt` is always the newest state.

    Lightning writes `last` only when a top-k checkpoint is saved at the same step; here, after Lightning's own
    logic has run, `last` is rewritten at every train-epoch end, validation end and at the end of fit if it does
    not yet hold the current global step. With `save_last="link"`, a step with no top-k file to link to gets a
    real file instead of a link to an older state. `save_last` defaults to True.
    """

    def __init__(self, *args: Any, save_last: Any = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self._last_written_step: Optional[int] = None

    def _save_last_checkpoint(self, trainer: "pl.Trainer", monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not self.save_last:
            return
        if self.save_last == "link" and self._last_global_step_saved != trainer.global_step:
            # no top-k file of this step to link to: a link would name an older state, so write the file itself
            self.save_last = True
            try:
                super()._save_last_checkpoint(trainer, monitor_candidates)
            finally:
                self.save_last = "link"
        else:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step

    def _refresh_last(self, trainer: "pl.Trainer") -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if (
            not self.save_last
            or trainer.fast_dev_run
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or trainer.global_step == 0  # nothing trained: nothing newer than the initial weights to keep
            or self._last_written_step == trainer.global_step
        ):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # Lightning's hook first: it may save a top-k file (and last with it) at this step, which _refresh_last
    # then sees; the other order would mark the step as saved and make Lightning skip its top-k save. For the
    # same reason last is not refreshed at a validation end when Lightning saves its top-k at the train-epoch
    # end that follows (validation once per epoch): that hook refreshes it.

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._refresh_last(trainer)

    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)
        self._refresh_last(trainer)


def last_checkpoint_path(trainer: "pl.Trainer") -> Optional[str]:
    """Where `last.ckpt` goes: the first ModelCheckpoint that saves a last file, else None."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, _LightningModelCheckpoint) and cb.save_last and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return None


def newest_checkpoint(trainer: "pl.Trainer", extra: tuple[str, ...] = ()) -> Optional[str]:
    """The most recently written checkpoint file this run's checkpoint callbacks know of (last, best, top-k,
    and `extra`), or None when none exists yet. Used to tell the user what to resume from."""
    candidates = set(extra)
    for cb in trainer.checkpoint_callbacks:
        for attr in ("last_model_path", "best_model_path", "ckpt_path"):
            candidates.add(getattr(cb, attr, "") or "")
        candidates.update(getattr(cb, "best_k_models", {}) or {})
    times = {}
    for path in filter(None, candidates):
        with contextlib.suppress(Exception):  # an unreachable remote path is simply not a candidate
            fs = get_filesystem(path)
            if fs.exists(path):
                times[path] = fs.modified(path).timestamp() if _local_path(path) is None else os.path.getmtime(path)
    return max(times, key=times.get) if times else None
