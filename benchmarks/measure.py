"""What the throughput benchmark measures with: device synchronisation, a peak matmul rate, peak memory, and FLOP
counting of the CPU attention kernel (torch counts the GPU kernels but not the CPU one)."""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import time
from typing import Optional

import torch
from torch.utils import flop_counter

# -- FLOP counting: torch counts the GPU attention kernels but not the CPU one; same formula for it ---------------

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# -- the device -----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor() or "CPU") if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{model}, {torch.get_num_threads()} threads"


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """The best TFLOP/s of an n x n x n matmul in `dtype`: what this device reaches on the op that dominates a ViT.
    On a CPU, per second of this process's CPU time (see `Trainer.timed`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 2
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for i in range(reps + 1):
        synchronize(device)
        t0 = clock()
        for _ in range(inner):
            a @ b
        synchronize(device)
        if i:  # the first round warms up
            best = min(best, (clock() - t0) / inner)
    return 2 * n**3 / best / 1e12


class PeakMemory:
    """Peak memory of one model's training, MiB. CUDA: max allocated minus what was allocated before the model
    was built (other models' weights and the shared batches excluded). CPU: growth of the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs) over the resident set before building, after returning
    freed memory to the OS; None where the kernel does not allow the reset."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = self._status_kib("VmRSS:")
        except (OSError, StopIteration):
            self.base = None

    def peak_mib(self) -> Optional[float]:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.base is None:
            return None
        return (self._status_kib("VmHWM:") - self.base) / 1024


# -- the models -------------------------------------------------------------------------------------------------
