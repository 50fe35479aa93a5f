"""The learning rate under train/: Lightning's LearningRateMonitor names it `lr-AdamW/pg1`, `lr-AdamW/pg2`, one tag per
parameter group (vitx has two: with and without weight decay) beside train/ and val/ in the Scalars tab.

Here it is `train/lr` when every group has the same rate (vitx's schedule scales all groups alike; layer-wise
decay does not), else `train/lr/pg1`, `train/lr/pg2`, ...; momentum and weight decay, when asked for, likewise
`train/momentum...`, `train/weight_decay...`.
"""
from __future__ import annotations

import re
from typing import Dict

from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor

_NAME = re.compile(r"^lr-[^/]*?(?P<what>-momentum|-weight_decay)?(?P<group>/pg\d+)?$")


def tidy_lr_tags(stats: Dict[str, float]) -> Dict[str, float]:
    """Lightning's `lr-<Optimizer>[-momentum|-weight_decay][/pgN]` -> `train/<lr|momentum|weight_decay>[/pgN]`, the
    groups folded into one tag where they are equal."""
    out: Dict[str, Dict[str, float]] = {}
    for key, value in stats.items():
        m = _NAME.match(key)
        if m is None:
            out.setdefault(key, {})[""] = value
            continue
        base = "train/" + ((m.group("what") or "-lr")[1:])
        out.setdefault(base, {})[m.group("group") or ""] = value
    tidy: Dict[str, float] = {}
    for base, groups in out.items():
        values = list(groups.values())
        if len(set(float(v) for v in values)) == 1:
            tidy[base] = values[0]
        else:
            tidy.update({base + g: v for g, v in groups.items()})
    return tidy


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's LearningRateMonitor (same arguments), logging under train/ (see the module docstring)."""

    def _extract_stats(self, trainer, interval: str) -> Dict[str, float]:
        return tidy_lr_tags(super()._extract_stats(trainer, interval))
