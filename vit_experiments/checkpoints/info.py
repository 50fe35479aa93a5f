"""What a checkpoint file is: one description, whatever wrote the file.

`read_checkpoint(path)` returns a `CheckpointInfo`: the family of the network (ViT, ResNet or CLIP), its
configuration when the file names one, its weights in the network's own key layout, the normalisation it was
trained with, its class names and its caption tokenizer. Fine-tuning, DeiT teachers, `vitx validate/test` and
`vitx analyze` all read weights through it.

Readers. A reader is a function `(contents, path) -> CheckpointInfo | None`: `contents` is what
`io.load_file(path)` returned (a dict from torch.load, a dict of tensors from a .safetensors file, a dict of numpy
arrays from an .npz file, or an `io.LoadedDirectory` for a folder); it returns None when it does not recognise
them and raises ValueError, saying what to do, when it recognises them but cannot read them. Readers are tried in
the order they were registered with `register_reader(reader)`, then those registered with `fallback=True`
(`read_state_dict`: any dict of tensors, without an architecture); the first that returns an info wins. vitx's
own checkpoints are read here; the readers of other libraries' layouts live in their own modules (timm_vit,
hf_vit, big_vision, ...), which register themselves when vit_experiments.checkpoints is imported. A reader puts
the weights in the network's own (vitx) key layout, names its layout in `source` ("timm", "hf-vit",
"big_vision", ...), and says in `notes` what it inferred rather than read (see infer.py). Options the user gives
for inference (`read_checkpoint(path, num_heads=N)`, or a `#num_heads=N` suffix on the path) reach readers
through `infer.overrides()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from vit_experiments.checkpoints.infer import overriding, split_path_options
from vit_experiments.checkpoints.io import load_file
from vit_experiments.models.clip import CLIP, CLIPConfig
from vit_experiments.models.resnet import ResNet, ResNetConfig
from vit_experiments.models.text import TextConfig
from vit_experiments.models.vit import ViTConfig, VisionTransformer

# the checkpoint key under which vitx tasks keep what a model needs besides its weights
METADATA_KEY = "vitx"
FORMAT_VERSION = 1
FAMILIES = ("vit", "resnet", "clip")
NetworkConfig = Union[ViTConfig, ResNetConfig, CLIPConfig]


@dataclass
class CheckpointInfo:
    """A checkpoint, described independently of the code that wrote it."""

    path: str
    source: str  # the layout: "vitx" (written by a vitx task), "state_dict" (bare weights), "timm", "hf-vit", ...
    family: Optional[str]  # "vit" (also DeiT), "resnet" or "clip"; None when the weights do not say
    config: Optional[NetworkConfig]  # None for bare weights: the caller supplies the architecture
    state_dict: dict[str, torch.Tensor]  # the network's weights, in its own key layout
    normalization: Optional[dict[str, list[float]]] = None  # {"mean": [...], "std": [...]} of [0, 1] pixels
    class_names: Optional[list[str]] = None
    tokenizer: Optional[str] = None  # CLIP: the caption tokenizer's JSON
    task: Optional[str] = None  # the class path of the vitx task that wrote it
    hparams: dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    global_step: Optional[int] = None
    notes: list[str] = field(default_factory=list)  # what the reader inferred or changed, for the user to check

    def describe(self) -> str:
        what = self.family or "unknown network"
        return f"{self.path}: {what} weights ({self.source}{', ' + self.task if self.task else ''})"

    def build(self) -> nn.Module:
        """The network with these weights (every key must match), in eval mode."""
        if self.config is None:
            raise ValueError(f"{self.path} holds bare weights without an architecture; build the model yourself "
                             "and load them with vit_experiments.checkpoints.load_weights")
        # the weights come from the file: initialise without drawing from the global generator, so a run that
        # loads a network (a teacher) makes the same random draws as one that does not
        with torch.random.fork_rng(devices=[]):
            model = build_network(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def vision_transformer(self) -> VisionTransformer:
        """The ViT inside: the network of a ViT or DeiT checkpoint, CLIP's image tower."""
        if self.family == "resnet":
            raise ValueError(f"{self.path} is a ResNet: the attention analyses need a vision transformer")
        model = self.build()
        return model.visual if isinstance(model, CLIP) else model


def build_network(config: NetworkConfig) -> nn.Module:
    if isinstance(config, CLIPConfig):
        return CLIP(config)
    if isinstance(config, ResNetConfig):
        return ResNet(config)
    return VisionTransformer(config)


def family_of(config: NetworkConfig) -> str:
    return "clip" if isinstance(config, CLIPConfig) else "resnet" if isinstance(config, ResNetConfig) else "vit"


def config_from_dict(family: str, d: dict) -> NetworkConfig:
    """A network configuration from its dataclasses.asdict() form (as saved in checkpoints)."""
    d = dict(d)
    if family == "clip":
        return CLIPConfig(vision=ViTConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)
    if family == "resnet":
        return ResNetConfig(**d)
    return ViTConfig(**d)


def network_metadata(config: NetworkConfig) -> dict[str, Any]:
    return {"family": family_of(config), "network": dataclasses.asdict(config)}


# -- readers ---------------------------------------------------------------------------------------------------

Reader = Callable[[Any, str], Optional[CheckpointInfo]]
READERS: list[Reader] = []
FALLBACK_READERS: list[Reader] = []  # tried after every other reader: they accept anything that looks like weights


def register_reader(reader: Reader, fallback: bool = False) -> Reader:
    """Add a reader for another layout. A reader returns None for contents it does not recognise. Readers are
    tried in registration order, the fallbacks (fallback=True) last."""
    (FALLBACK_READERS if fallback else READERS).append(reader)
    return reader


def _strip(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@register_reader
def read_vitx(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """A checkpoint written by a vitx task: the network under `state_dict` with the prefix `model.`, what it
    needs besides its weights under METADATA_KEY."""
    if not isinstance(contents, dict) or not isinstance(contents.get(METADATA_KEY), dict):
        return None
    meta = contents[METADATA_KEY]
    family = meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"{path}: unknown network family {family!r} in its vitx metadata (expected one of "
                         f"{', '.join(FAMILIES)}); was it written by a newer vitx?")
    return CheckpointInfo(
        path=path, source="vitx", family=family, config=config_from_dict(family, meta["network"]),
        state_dict=_strip(contents.get("state_dict") or {}, "model."),
        normalization=meta.get("normalization"), class_names=meta.get("class_names"),
        tokenizer=meta.get("tokenizer"), task=meta.get("task"), hparams=contents.get("hyper_parameters") or {},
        epoch=contents.get("epoch"), global_step=contents.get("global_step"),
    )


def _guess_family(state: dict) -> Optional[str]:
    if "visual.patch_embed.proj.weight" in state and "logit_scale" in state:
        return "clip"
    if "patch_embed.proj.weight" in state:
        return "vit"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "resnet"
    return None


@partial(register_reader, fallback=True)
def read_state_dict(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """Bare weights saved with torch.save(model.state_dict()) in vitx's (the common) key layout, or a Lightning
    checkpoint of another program whose network sits under `model.`."""
    if not isinstance(contents, dict):
        return None
    state = contents.get("state_dict", contents)
    if isinstance(state, dict) and "state_dict" in contents:
        state = _strip(state, "model.") or state
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return CheckpointInfo(path=path, source="state_dict", family=_guess_family(state), config=None,
                          state_dict=dict(state))


def read_checkpoint(path: str, trust: bool = False, num_heads: Optional[int] = None) -> CheckpointInfo:
    """Describe the checkpoint at `path` (a file or a folder; see the module docstring). `num_heads` (or a
    `#num_heads=N` suffix on the path) sets the attention heads of an architecture inferred from the weights."""
    path, options = split_path_options(str(path))
    if num_heads is not None:
        options["num_heads"] = num_heads
    contents = load_file(path, trust=trust)
    with overriding(**options):
        for reader in READERS + FALLBACK_READERS:
            info = reader(contents, str(path))
            if info is not None:
                return info
    raise ValueError(f"{path} is not a checkpoint vitx can read: not a vitx checkpoint (written by `vitx fit`), "
                     "nor ViT/DeiT weights in the timm, Hugging Face or big_vision layout, nor any layout a reader "
                     "is registered for, nor a state dict of tensors")
