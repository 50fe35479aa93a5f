"""The task core: everything a vitx task needs besides its network and its loss, written once for every family.

A task (ViT or ResNet classifier, DeiT student, CLIP) subclasses `VisionTask`, builds its network as `self.model`,
and implements `training_step`, `evaluate(batch, stage)` and, if it augments, `prepare_batch`. The core gives it:

* plain-typed hyperparameters (`save_task_hyperparameters`), so checkpoints load with `weights_only=True`, and a
  `_class_path` with which `vitx validate --ckpt_path` rebuilds the task;
* `restoring(stage)`: a task built to receive a checkpoint's weights (`--ckpt_path`, `load_from_checkpoint`) does
  not read the files it would start from (`init_from`; the checkpoint overwrites those weights anyway), so a
  checkpoint stays usable after they move; the paths stay in its hyperparameters as provenance;
* the normalisation, resolved once: the one the user gave, else the one a checkpoint was trained with, else the
  data module's preset, else the family's default; saved in every checkpoint under METADATA_KEY with the network
  configuration, the class names and (CLIP) the tokenizer, which is what `vit_experiments.checkpoints` reads;
* the data module checks (image size, label set) and the class names taken from the data;
* uint8 batches normalised (and augmented) on the accelerator, after the transfer;
* the validation/test/predict plumbing, AdamW with warm-up + cosine and layer-wise decay;
* the scaling hooks for any backbone: FSDP2 `configure_model`, activation checkpointing and torch.compile, per
  unit of the network's `scaling_units()` (transformer blocks; residual stages of a ResNet).
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import torch
from torch import nn

from data_pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, random_hflip
from vit_experiments.checkpoints import METADATA_KEY, load_weights, network_metadata
from vit_experiments.checkpoints.info import FORMAT_VERSION
from vit_experiments.scaling import compile_network, compile_units, shard_network
from vit_experiments.tasks.optim import OptimConfig, build_optimizer


_RESTORING: ContextVar[Optional[str]] = ContextVar("vitx_restoring", default=None)


@contextmanager
def restoring(stage: str) -> Iterator[None]:
    """Tasks built inside get their weights from a checkpoint next: `stage` is "fit" (resuming) or what the
    weights are for ("validate", "test", "predict", "load")."""
    token = _RESTORING.set(stage)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def restoring_stage() -> Optional[str]:
    """The stage of `restoring` a task is being built in, or None for a task that starts from its own weights."""
    return _RESTORING.get()


def plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: what torch.load(weights_only=True) reads back."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def as_config(cls: type, value: Any) -> Any:
    """A config dataclass from itself or its dict form (hyperparameters read back from a checkpoint)."""
    return cls(**value) if isinstance(value, dict) else value


def _triple(values: Optional[Sequence[float]], name: str) -> Optional[tuple[float, ...]]:
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if not values or any(v <= 0 for v in values) and name == "std":
        raise ValueError(f"{name} must be per-channel values (std > 0), got {list(values)}")
    return values


class VisionTask(L.LightningModule):
    """The shared core of every vitx task (see the module docstring).

    Args:
        optim: AdamW, warm-up + cosine, layer decay.
        mean, std: per-channel normalisation of [0, 1] pixels; None takes it from a checkpoint being resumed or
            evaluated, else the data module's preset, else `default_normalization`.
        init_from: a checkpoint to start from (fine-tuning), read by vit_experiments.checkpoints: position
            embedding resampled to the model's image size, a classifier of another label set replaced. Not read
            when the task is restored from a checkpoint of its own (`restoring`); kept in the hyperparameters.
        reset_head: with init_from, restart the classifier from zero even when the label set is the same.
    """

    default_normalization = (IMAGENET_MEAN, IMAGENET_STD)

    def __init__(self, optim: OptimConfig, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.optim_cfg = as_config(OptimConfig, optim)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then the data module's preset is used)")
        self.given_normalization = (mean is not None)
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        self.class_names: Optional[list[str]] = None
        self.init_notes: list[str] = []
        self.augmented_batches = 0  # training batches prepared so far: the key of their augmentation draws
        # the stage this task is built to be restored for (`restoring`), None for a fresh start: files that only
        # give a starting state (init_from, a tokenizer the checkpoint carries) need not be read then
        self.restored_for: Optional[str] = restoring_stage()

    # -- hyperparameters and initial weights ---------------------------------------------------------------
    def save_task_hyperparameters(self, **values: Any) -> None:
        """Save the task's arguments as plain types, with the class path that rebuilds it."""
        cls = type(self)
        self.save_hyperparameters({"_class_path": f"{cls.__module__}.{cls.__qualname__}", **plain(values)})

    def init_weights_from(self, init_from: Optional[str], reset_head: bool = False) -> None:
        """Fine-tuning: start from `init_from`'s weights; not read when the task is being restored from a checkpoint,
        whose weights replace these."""
        if init_from and self.restored_for is None:
            self.init_notes = load_weights(self.model, init_from, reset_head)

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> Any:
        """Lightning's load_from_checkpoint, with the task built as `restoring("load")`."""
        with restoring("load"):
            return super().load_from_checkpoint(*args, **kwargs)

    # -- what the network is --------------------------------------------------------------------------------
    def image_size(self) -> int:
        return self.model.cfg.image_size

    def num_classes(self) -> Optional[int]:
        """The size of the label set the task predicts (None for a task without one, e.g. CLIP)."""
        return getattr(self.model.cfg, "num_classes", None)

    def analysis_backbone(self) -> Optional[nn.Module]:
        """The VisionTransformer the attention analyses look at (None: the network has no attention)."""
        return None

    def network_config(self) -> Any:
        return self.model.cfg

    # -- normalisation ----------------------------------------------------------------------------------------
    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the images are normalised with."""
        if self.mean is None:
            return self.default_normalization
        return self.mean, self.std

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = _triple(mean, "mean"), _triple(std, "std")
        self.on_normalization(self.mean, self.std)

    def on_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Called when the normalisation is (re)resolved: a task whose parts depend on it updates them here."""

    # -- the data ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.check_datamodule(dm)
        if not self.given_normalization:
            dm_mean, dm_std = getattr(dm, "mean", None), getattr(dm, "std", None)
            if dm_mean is not None and dm_std is not None:
                self.set_normalization(dm_mean, dm_std)  # a checkpoint's own, if resuming, replaces it later
            else:
                self.set_normalization(*self.normalization)
        else:
            self.on_normalization(self.mean, self.std)
        names = getattr(dm, "class_names", None)
        if names:
            self.class_names = list(names)
        for note in self.init_notes:
            self.print(f"init_from: {note}")

    def check_datamodule(self, dm: Any) -> None:
        """The data must fit the network: the same crop size and, for a classifier, the same label set."""
        if dm is None:
            return
        size = getattr(dm, "image_size", None)
        if size is not None and size != self.image_size():
            raise ValueError(
                f"the data is cropped to {size} px but the model expects {self.image_size()} px: set "
                f"--data.image_size {self.image_size()}, or the model's image_size to {size}")
        classes, own = getattr(dm, "num_classes", None), self.num_classes()
        if classes is not None and own is not None and own > 0 and classes != own:
            raise ValueError(f"the data has {classes} classes but the model predicts {own}: set the model's "
                             f"num_classes to {classes} (or leave it unset to take it from the data)")

    def on_fit_start(self) -> None:
        if self.trainer.log_dir and self.trainer.logger is not None:
            self.print(f"run directory: {self.trainer.log_dir} (TensorBoard: make tensorboard)")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self._trainer is not None and self.trainer.training
        if not training:
            return self.prepare_batch(batch, training)
        # the random draws of batch augmentation are a function of (seed, rank, training batch number), which the
        # checkpoint holds, so a resumed run augments its batches exactly as an uninterrupted one (Lightning saves
        # no random generator state); the global generator itself is left as it was
        seed = hash((int(os.environ.get("PL_GLOBAL_SEED", 0)), self.global_rank, self.augmented_batches)) % 2**63
        self.augmented_batches += 1
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.prepare_batch(batch, training)

    def prepare_batch(self, batch: Any, training: bool) -> Any:
        """uint8 images -> normalised float32 on the accelerator; flipped left-right in training when the task
        has `hflip` set."""
        images = batch[0]
        if training and getattr(self, "hflip", False):
            images = random_hflip(images)
        return (normalize(images, *self.normalization), *batch[1:])

    # -- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self, batch: Any, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self.model(batch[0]).softmax(-1)  # (B, K)
        return {"probs": probs, "pred": probs.argmax(-1)}

    # -- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self.model, self.optim_cfg, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Once per optimiser step, after it, on every device (also with gradient accumulation)."""

    # -- scaling ----------------------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> int:
        """Activation checkpointing of every unit of the trained network; returns the number of units."""
        self.model.set_grad_checkpointing(enable)
        return len(self.model.scaling_units())

    def compile_units(self, **compile_kwargs: Any) -> int:
        """torch.compile every unit of the trained network in place (parameter names unchanged)."""
        return compile_units(self.model, **compile_kwargs)

    # the network's methods that the training step calls (CompileBlocks(scope="model") compiles these)
    compiled_entry_points: tuple[str, ...] = ("forward",)

    def compile_model(self, **compile_kwargs: Any) -> int:
        """torch.compile the whole trained network in place, at the methods the training step calls."""
        return compile_network(self.model, self.compiled_entry_points, **compile_kwargs)

    def sharded_modules(self) -> list[nn.Module]:
        """The networks FSDP2 shards, each its own root; copies that follow the trained one parameter by parameter
        (an EMA) are added by the task. A frozen teacher stays whole on every device."""
        return [self.model]

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy (conf/trainer/fsdp.yaml); nothing under any other."""
        if self.device_mesh is not None:
            for module in self.sharded_modules():
                shard_network(module, self.device_mesh, str(self.trainer.precision))

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        """What a model needs besides its weights; tasks add their own (the tokenizer)."""
        cls = type(self)
        mean, std = self.normalization
        return {"format": FORMAT_VERSION, "task": f"{cls.__module__}.{cls.__qualname__}",
                **network_metadata(self.network_config()),
                "normalization": {"mean": list(mean), "std": list(std)}, "class_names": self.class_names,
                "augmented_batches": self.augmented_batches}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[METADATA_KEY] = self.checkpoint_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(METADATA_KEY) or {}
        norm = meta.get("normalization")
        if norm and not self.given_normalization:  # the model keeps the normalisation it was trained with
            self.set_normalization(norm["mean"], norm["std"])
        self.augmented_batches = int(meta.get("augmented_batches") or 0)
        if meta.get("class_names") and not self.class_names:
            self.class_names = list(meta["class_names"])
