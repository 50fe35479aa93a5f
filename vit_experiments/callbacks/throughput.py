"""Images per second (and, given the FLOPs of a batch, model FLOPs utilisation) in TensorBoard.

A thin layer over Lightning's ThroughputMonitor that knows a vitx batch: images first. It logs
`train/device/samples_per_sec` (images/s on one device) and, with several devices, `train/samples_per_sec`.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def images_in_batch(batch: Any) -> int:
    return len(batch[0])


class ImageThroughput(ThroughputMonitor):
    """Args:
        window_size: number of batches the rate is averaged over (it is first logged after that many).
    """

    def __init__(self, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=images_in_batch, window_size=window_size)
