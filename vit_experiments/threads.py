"""CPU threads of a vitx process, decided where vitx starts: before torch is imported.

Why: the training process's intra-op threads (one per core, from torch) spin while they wait for work (GNU
OpenMP's default wait policy). On a CPU shared with other jobs the spinning threads take cores from the loader
workers and from the other jobs, and are themselves descheduled in the middle of parallel regions: `make pretrain`
on 2 busy cores ran at a tenth of its idle rate. A passive wait policy (threads sleep at once
when idle) keeps most of the idle rate and holds up beside other jobs; measured side by side by
`python -m benchmarks cpu_threads` (README, "Performance").

OMP_WAIT_POLICY is read by the OpenMP runtime when torch loads it, so it must be in the environment before the
first `import torch`: `vit_experiments.cli` calls `configure()` first thing, before Lightning (and torch) are
imported. DataLoader worker processes run one intra-op thread each (torch sets that in every worker).

The user wins: an OMP_WAIT_POLICY already in the environment is kept (vitx never sets OMP_NUM_THREADS, so the
user's thread count always stands), and VITX_THREADS=off leaves torch's defaults alone altogether.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

# what vitx puts in the environment when the user has not set it
POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
OFF_VALUES = ("off", "0", "false", "torch", "default")


def configure(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Put vitx's thread policy into `environ` where the user set nothing; returns what it set.

    Does nothing with VITX_THREADS=off. Has no effect on a process that imported torch already (the OpenMP
    runtime has read its environment by then): it is for the start of a `vitx` process."""
    if environ.get("VITX_THREADS", "").strip().lower() in OFF_VALUES:
        return {}
    if "torch" in sys.modules and environ is os.environ:
        return {}  # too late for this process; and the user's own program chose its threads already
    chosen = {key: value for key, value in POLICY.items() if key not in environ}
    environ.update(chosen)
    return chosen
