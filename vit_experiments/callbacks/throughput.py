"""Images per second in TensorBoard, under perf/.

A thin layer over Lightning's ThroughputMonitor that knows a vitx batch (images first) and logs only rates:
  perf/train_images_per_sec               all devices together (one device: the same as per device)
  perf/train_images_per_sec_per_device
Lightning's running counts (train/time, train/batches, train/samples) are left out, and so are the rates of
validation, which Lightning logs against the validation batch count, not the training step that every other
chart is drawn against. The run summary (vit_experiments.callbacks.dashboard) gives the totals. The newest
training rate is kept in `train_images_per_sec`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from lightning.pytorch.callbacks import ThroughputMonitor

STAGES = {"train": "train", "validate": "val", "test": "test", "predict": "predict"}


def images_in_batch(batch: Any) -> int:
    return len(batch[0])


def perf_tags(stage: str, metrics: Dict[str, float]) -> Dict[str, float]:
    """Lightning's throughput metrics of one stage -> the perf/ rates vitx logs (counts and FLOPs left out)."""
    name = STAGES.get(stage, stage)
    out = {}
    for key, tag in (("device/samples_per_sec", f"perf/{name}_images_per_sec_per_device"),
                     ("samples_per_sec", f"perf/{name}_images_per_sec")):
        if key in metrics:
            out[tag] = float(metrics[key])
    if f"perf/{name}_images_per_sec" not in out and f"perf/{name}_images_per_sec_per_device" in out:
        out[f"perf/{name}_images_per_sec"] = out[f"perf/{name}_images_per_sec_per_device"]  # one device
    return out


class ImageThroughput(ThroughputMonitor):
    """Args:
        window_size: number of batches the rate is averaged over (it is first logged after that many).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)
        self.train_images_per_sec: Optional[float] = None

    def _compute(self, trainer: Any, iter_num: Optional[int] = None) -> None:
        # ThroughputMonitor's, with the perf/ tags
        if not trainer._logger_connector.should_update_logs:
            return
        stage = trainer.state.stage
        if stage.value != "train":
            return
        metrics = perf_tags(stage.value, self._throughputs[stage].compute())
        if "perf/train_images_per_sec" in metrics:
            self.train_images_per_sec = metrics["perf/train_images_per_sec"]
        if metrics:
            trainer._logger_connector.log_metrics(metrics, step=iter_num)
