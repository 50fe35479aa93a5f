"""The one place that opens a checkpoint file or folder.

`load_file(path, trust=False)` returns, by what the path holds (the extension, else the file's first bytes):

- a directory (Hugging Face `save_pretrained`, or an open_clip folder): a `LoadedDirectory` with the config and
  the weights of one layout -- "hf": config.json with model.safetensors (or its shards model-*-of-*.safetensors)
  or pytorch_model.bin (or its shards); "open_clip": open_clip_config.json with open_clip_model.safetensors or
  open_clip_pytorch_model.bin. When both are there, the layout whose weights are present wins, "hf" first.
- a `.safetensors` file: the dict of tensors it holds (name -> torch.Tensor), on the CPU.
- a `.npz` file (big_vision / AugReg): a dict of numpy arrays (name -> numpy.ndarray), as saved; readers convert
  them (a JAX kernel needs transposing anyway). No pickle is read (allow_pickle=False).
- anything else (.pth, .bin, .ckpt, ...; a local path or http(s)://, s3://, gs://, ...): the unpickled contents,
  loaded with `torch.load(weights_only=True)`: tensors and plain containers only, so a file cannot run code while
  it loads. Lightning loads remote checkpoints with `weights_only=False` unless told otherwise; vitx always tells
  it. A user who trusts a file that needs full unpickling says so (`trust=True`, `--trust-checkpoint`).

A missing path raises FileNotFoundError; a truncated, corrupt or unsafe file raises ValueError saying what to do.
Nothing is downloaded except an explicitly remote path.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

UNTRUSTED_HINT = (
    "it holds objects other than tensors and plain Python values, and loading those could run code. If you trust "
    "the file, pass --trust-checkpoint (vitx analyze) or --weights_only false (vitx fit/validate/test)"
)
DAMAGED_HINT = "the file may be truncated or damaged (an interrupted download or copy): copy or save it again"


@dataclass
class LoadedDirectory:
    """A checkpoint folder: the config and weights of one layout (see the module docstring)."""

    path: str
    layout: str  # "hf" or "open_clip": which files the weights and `config` come from
    config: Optional[dict]  # config.json ("hf") or open_clip_config.json ("open_clip"); None when absent
    state_dict: dict[str, torch.Tensor]  # every weight file of the layout merged (shards), on the CPU
    files: list[str]  # the weight files read, in order
    configs: dict[str, dict] = field(default_factory=dict)  # every *config.json of the folder, by file name


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


# weight files of each layout, in order of preference; the first pattern that matches a file is read (all its
# shards). A sharded checkpoint's index (*.index.json) is not needed: the shards together are the state dict.
_LAYOUTS = {
    "hf": ("config.json", (r"model\.safetensors", r"model-\d+-of-\d+\.safetensors", r"pytorch_model\.bin",
                           r"pytorch_model-\d+-of-\d+\.bin")),
    "open_clip": ("open_clip_config.json", (r"open_clip_model\.safetensors", r"open_clip_pytorch_model\.bin")),
}


# the configs that describe the model; other *config.json files in a folder are only carried along
_MODEL_CONFIGS = {cfg for cfg, _ in _LAYOUTS.values()} | {"preprocessor_config.json"}


def _weight_files(names: list[str], patterns: tuple[str, ...]) -> list[str]:
    for pattern in patterns:
        found = sorted(n for n in names if re.fullmatch(pattern, n))
        if found:
            return found
    return []


def load_directory(path: str, trust: bool = False) -> LoadedDirectory:
    """A Hugging Face or open_clip checkpoint folder -> LoadedDirectory (see the module docstring)."""
    names = sorted(os.listdir(path))
    configs = {}
    for name in names:
        if name.endswith("config.json") and os.path.isfile(os.path.join(path, name)):
            try:
                with open(os.path.join(path, name)) as f:
                    configs[name] = json.load(f)
            except (OSError, ValueError) as err:
                if name in _MODEL_CONFIGS:  # the model's own config: without it the weights cannot be read right
                    raise ValueError(
                        f"could not read {os.path.join(path, name)} as JSON ({err}); {DAMAGED_HINT}") from err
                # a side file (generation_config.json, ...) that vitx does not use: a broken one must not block
                warnings.warn(f"ignoring {os.path.join(path, name)}: not valid JSON ({err})", stacklevel=2)
    # the layout whose config is present first, then any layout with weights (a folder of bare shards)
    order = [k for k, (cfg, _) in _LAYOUTS.items() if cfg in configs] + list(_LAYOUTS)
    for layout in order:
        config_name, patterns = _LAYOUTS[layout]
        files = _weight_files(names, patterns)
        if files:
            break
    else:
        raise ValueError(
            f"{path} is a folder without weights vitx can read: expected config.json with model.safetensors or "
            "pytorch_model.bin (Hugging Face save_pretrained), or open_clip_config.json with "
            f"open_clip_model.safetensors or open_clip_pytorch_model.bin; it holds {names[:12]}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        part = load_file(os.path.join(path, name), trust=trust)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ValueError(f"{os.path.join(path, name)} is not a state dict of tensors")
        state.update(part)
    return LoadedDirectory(path=str(path), layout=layout, config=configs.get(config_name), state_dict=state,
                           files=[os.path.join(path, n) for n in files], configs=configs)


def _kind(path: str) -> str:
    """"safetensors", "npz", "torch" (a zip of torch.save, or a pickle) or "unknown", by extension, else by the
    first bytes of the file."""
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(".npz"):
        return "npz"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head[:4] == b"PK\x03\x04":  # a zip; a damaged one is left to torch.load to report
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".npy") for n in z.namelist()):
                    return "npz"  # torch.save also writes a zip, of pickles and raw storages, never .npy members
        return "torch"
    if head[:1] == b"\x80":  # a pickle's PROTO opcode: torch.save's legacy format, or a plain pickle
        return "torch"
    return "unknown"


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(path, device="cpu")
    except Exception as err:
        raise ValueError(f"could not read {path} as a safetensors file ({type(err).__name__}: {err}); "
                         f"{DAMAGED_HINT}") from err


def _load_npz(path: str) -> dict[str, Any]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except ValueError as err:
        if "pickle" in str(err):
            raise ValueError(f"refusing to load {path}: it holds pickled objects, not only arrays; a big_vision "
                             "checkpoint holds only arrays") from err
        raise ValueError(f"could not read {path} as an .npz archive ({err}); {DAMAGED_HINT}") from err
    except Exception as err:
        raise ValueError(f"could not read {path} as an .npz archive ({type(err).__name__}: {err}); "
                         f"{DAMAGED_HINT}") from err


def load_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """The contents of a checkpoint file or folder, on the CPU (see the module docstring for what each kind
    returns). Raises FileNotFoundError for a missing local path and ValueError, with what to do, for one that
    is damaged or not safe to load."""
    path = str(path)
    local = path.removeprefix("file://")
    if not is_remote(path):
        if os.path.isdir(local):
            return load_directory(local, trust=trust)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        kind = _kind(local)
        if kind == "safetensors":
            return _load_safetensors(local)
        if kind == "npz":
            return _load_npz(local)
        if kind == "unknown":
            raise ValueError(f"{path} is not a checkpoint vitx can read: neither a PyTorch file (torch.save), nor "
                             ".safetensors, nor .npz, nor a folder of weights")
    try:
        if is_remote(path):
            from lightning.fabric.utilities.cloud_io import _load

            return _load(path, map_location="cpu", weights_only=not trust)
        return torch.load(local, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise
    except Exception as err:
        if not trust and "weights_only" in str(err):
            raise ValueError(f"refusing to load {path}: {UNTRUSTED_HINT}") from err
        raise ValueError(f"could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}); "
                         f"{DAMAGED_HINT}") from err
