"""The terminal while a run trains: a progress bar in images per second, and a model summary without a FLOP count
of zero.

ImagesPerSecondBar (Rich where the `rich` package is installed, as Lightning chooses, else tqdm): Lightning's bar
counts batches per second ("it/s") and shows the logger's version as `v_num`; this one shows `img/s`, the images
of the last `window` training batches over their wall time, times the number of processes (every process trains
on as many images per step), and leaves out v_num (the run directory is printed at the start).

ModelSummary: Lightning's table, whose "Total FLOPs" line reads 0 for a module without an `example_input_array`
(no vitx task has one: the tasks take uint8 batches through their own transfer hook). The line is replaced by the
measured forward FLOPs of one image through the network (torch.utils.flop_counter, on a zero image of the
model's size), or left out where that cannot be measured.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table, get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class _ImagesPerSecond:
    """What both bars share: the img/s rate and the metrics shown beside the bar."""

    def _init_rate(self, window: int) -> None:
        self._window: collections.deque = collections.deque(maxlen=max(2, window))  # (time, images so far)
        self._images = 0
        self.images_per_sec: Optional[float] = None

    def _count(self, trainer: Any, batch: Any) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._images += len(images) if hasattr(images, "__len__") else 0
        self._window.append((time.perf_counter(), self._images))
        if len(self._window) >= 2:
            (t0, n0), (t1, n1) = self._window[0], self._window[-1]
            if t1 > t0:
                self.images_per_sec = (n1 - n0) / (t1 - t0) * max(1, trainer.world_size)

    def get_metrics(self, trainer: Any, pl_module: Any) -> Dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        metrics.pop("v_num", None)
        if self.images_per_sec is not None and trainer.training:
            metrics = {"img/s": f"{self.images_per_sec:,.0f}", **metrics}
        return metrics


class TQDMImagesPerSecondBar(_ImagesPerSecond, TQDMProgressBar):
    """tqdm bar: batches done of the epoch, elapsed and remaining time, img/s and the logged metrics."""

    def __init__(self, refresh_rate: int = 1, window: int = 20) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._init_rate(window)

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # no it/s
        return bar

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._count(trainer, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn

    class RichImagesPerSecondBar(_ImagesPerSecond, RichProgressBar):
        """Rich bar: as Lightning's, without its batches-per-second column (img/s is among the metrics)."""

        def __init__(self, refresh_rate: int = 1, window: int = 20) -> None:
            super().__init__(refresh_rate=refresh_rate)
            self._init_rate(window)

        def configure_columns(self, trainer) -> list:
            return [c for c in super().configure_columns(trainer) if not isinstance(c, ProcessingSpeedColumn)]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._count(trainer, batch)
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def images_per_second_bar(window: int = 20) -> ProgressBar:
    """The bar Lightning would choose (Rich when installed, else tqdm), in images per second."""
    if _RICH_AVAILABLE:
        return RichImagesPerSecondBar(window=window)
    return TQDMImagesPerSecondBar(window=window)


def _compiled(net: torch.nn.Module) -> bool:
    """Whether torch.compile has touched the network (CompileBlocks): a batch of one would compile it again."""
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in net.modules()):
        return True
    entry_points = ("forward", "forward_features")
    return any(hasattr(getattr(net, name, None), "_torchdynamo_orig_callable") for name in entry_points)


def forward_flops_per_image(pl_module: Any, strategy: str = "") -> Optional[int]:
    """FLOPs of one forward pass of one image through the module's image network (the CLIP image tower; the whole
    classifier, head included, otherwise), or None where that is not measured: a module that does not say its image
    size, a sharded strategy (a forward on one rank alone would wait for the others), a compiled network."""
    from torch.utils.flop_counter import FlopCounterMode

    size = getattr(pl_module, "image_size", None)
    model = getattr(pl_module, "model", None)
    if not callable(size) or model is None or any(s in strategy for s in ("FSDP", "DeepSpeed", "ModelParallel")):
        return None
    net = getattr(model, "visual", model)
    if _compiled(net):
        return None
    try:
        param = next(net.parameters())
        x = torch.zeros(1, 3, int(size()), int(size()), device=param.device, dtype=param.dtype)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                net(x)
        finally:
            net.train(was_training)
        return int(counter.get_total_flops()) or None
    except Exception:  # a network this cannot run: the line is left out, nothing else depends on it
        return None


class ModelSummary(_LightningModelSummary):
    """Lightning's plain model summary; its FLOPs line is the measured forward FLOPs of one image (see the module
    docstring). The number is kept in `flops_per_image` for the run summary."""

    flops_per_image: Optional[int] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.flops_per_image = forward_flops_per_image(pl_module, type(trainer.strategy).__name__)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        summary_data = [col for col in summary_data if col[0] != "FLOPs"]  # per layer: 0 for the same reason
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, total_training_modes,
                                      total_flops, *summary_data)
        lines = table.splitlines()[:-1]  # Lightning's "Total Flops" line, last of the table
        if self.flops_per_image:
            lines.append(f"{get_human_readable_count(self.flops_per_image):<10}FLOPs per image (forward)")
        rank_zero_info("\n" + "\n".join(lines))
