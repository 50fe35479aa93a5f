"""The one place that unpickles a checkpoint file.

Every checkpoint vitx reads, whatever its scheme (a local path, http(s)://, s3://, gs://, ...), is loaded with
`torch.load(weights_only=True)`: tensors and plain containers only, so a file cannot run code while it loads.
Lightning loads remote checkpoints with `weights_only=False` unless told otherwise; vitx always tells it. A
user who trusts a file that needs full unpickling says so (`trust=True`, `--trust-checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

UNTRUSTED_HINT = (
    "it holds objects other than tensors and plain Python values, and loading those could run code. If you trust "
    "the file, pass --trust-checkpoint (vitx analyze) or --weights_only false (vitx fit/validate/test)"
)


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def load_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """The unpickled contents of a checkpoint file, on the CPU. Raises FileNotFoundError for a missing local
    file and ValueError, with what to do, for a file that is not safe to load."""
    path = str(path)
    if not is_remote(path) and not os.path.isfile(path.removeprefix("file://")):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if is_remote(path):
            from lightning.fabric.utilities.cloud_io import _load

            return _load(path, map_location="cpu", weights_only=not trust)
        return torch.load(path.removeprefix("file://"), map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except Exception as err:
        if not trust and "weights_only" in str(err):
            raise ValueError(f"refusing to load {path}: {UNTRUSTED_HINT}") from err
        raise ValueError(f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err})") from err
