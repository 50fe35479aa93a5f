"""Readers for pretrained CLIP weights of other libraries (Radford et al. 2021): Hugging Face, open_clip, OpenAI.

Registered with vit_experiments.checkpoints.info.register_reader, so `read_checkpoint(path)` (and so `vitx
analyze`, `vitx zeroshot`, `--model.init_from`) reads, from local files only:

- "hf-clip": a `transformers` CLIPModel folder (config.json with model.safetensors or pytorch_model.bin), or
  its weights file with the config.json beside it;
- "open_clip": an open_clip checkpoint of a ViT model: its folder (open_clip_config.json with
  open_clip_model.safetensors / open_clip_pytorch_model.bin), a bare state dict, or a training checkpoint (the
  weights under `state_dict`, with or without DistributedDataParallel's `module.` prefix);
- "openai": OpenAI's state dicts (the same key layout), also taken out of their TorchScript archives when the
  file is trusted (`--trust-checkpoint`: loading TorchScript is not restricted to tensors).

The architecture comes from the shapes of the weights: depth (the number of blocks), widths, MLP sizes, patch
and image size (the position embedding's grid), context length, vocabulary and embedding width; heads from the
config when there is one, else width // 64 (OpenAI's rule for both towers). The MLP activation, which the
weights cannot show, is chosen in this order: an override (`vitx zeroshot --act`, or the environment variable
VITX_CLIP_ACT for every entry point); a config beside the weights (config.json's hidden_act;
open_clip_config.json's quick_gelu); open_clip's default, GELU, for a file that says it is open_clip's (its
folder, a file named open_clip_*, a training checkpoint); otherwise quick_gelu, OpenAI's, whose weights were
trained with it (open_clip's `-quickgelu` models too: give their config or the override). The caption's
feature is read where the library reads it: OpenAI and open_clip at the highest token id (argmax), Hugging Face
at the first eos_token_id, or at the argmax for the old configs with eos_token_id 2, as transformers does.

The tokenizer that came with the weights (tokenizer.json, bpe_simple_vocab_16e6.txt.gz, or vocab.json with
merges.txt in the same folder; data_pipelines.bpe) is carried as CheckpointInfo.tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from vit_experiments.checkpoints.clip_layouts import to_vitx_hf, to_vitx_openai
from vit_experiments.checkpoints.hf_vit import HF_ACTIVATIONS
from vit_experiments.checkpoints.infer import overrides, overriding
from vit_experiments.checkpoints.info import CheckpointInfo, register_reader
from vit_experiments.models.clip import CLIP, CLIPConfig
from vit_experiments.models.text import TextConfig
from vit_experiments.models.vit import ViTConfig

# what a reader is told besides the file: set with clip_overrides() or the environment (VITX_CLIP_ACT, ...)
OVERRIDE_ENV = {"act": "VITX_CLIP_ACT", "vision_heads": "VITX_CLIP_VISION_HEADS", "text_heads": "VITX_CLIP_TEXT_HEADS"}


@contextmanager
def clip_overrides(**values: Any) -> Iterator[None]:
    """Within the block, the CLIP readers use these (act, vision_heads, text_heads; None = not set) over what
    they infer (held like every reader override, by checkpoints.infer.overriding)."""
    bad = set(values) - set(OVERRIDE_ENV)
    if bad:
        raise TypeError(f"unknown CLIP override(s) {sorted(bad)}; valid: {', '.join(OVERRIDE_ENV)}")
    with overriding(**values):
        yield


def _override(name: str) -> Optional[Any]:
    value = overrides().get(name, os.environ.get(OVERRIDE_ENV[name]) or None)
    if value is not None and name.endswith("heads"):
        value = int(value)
    return value


def _sidecars(folder: str) -> dict[str, dict]:
    """The JSON configs beside a weights file that describe CLIP models."""
    found = {}
    for name in ("config.json", "open_clip_config.json", "preprocessor_config.json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    found[name] = json.load(f)
            except (OSError, ValueError) as err:
                raise ValueError(f"could not read {p}, the config beside the CLIP weights, as JSON ({err}); "
                                 "repair or remove it") from err
    return found


def _contents(contents: Any, path: str) -> Optional[tuple[dict, Optional[dict], str, Optional[str]]]:
    """(state dict, configs by file name (None for a file: read them with _sidecars once the layout is
    recognised), folder of the weights, layout of a folder or None); None when the contents hold no tensors."""
    if hasattr(contents, "state_dict") and hasattr(contents, "layout"):  # a folder (checkpoints.io)
        configs = dict(getattr(contents, "configs", {}) or {})
        return dict(contents.state_dict), configs, str(contents.path), contents.layout
    if isinstance(contents, torch.jit.ScriptModule):  # OpenAI's archive, loaded because the user trusts it
        contents = dict(contents.state_dict())
    if not isinstance(contents, dict):
        return None
    state = contents.get("state_dict", contents)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    folder = os.path.dirname(os.path.abspath(path)) if "://" not in path else ""
    return dict(state), None, folder, None


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.fullmatch(pattern, k))})


def _grid_side(tokens: int, what: str) -> int:
    side = math.isqrt(max(tokens - 1, 0))
    if side * side != tokens - 1:
        raise ValueError(f"{what} has {tokens} positions, not a class token + a square grid of patches: vitx's "
                         "CLIP reads square images only")
    return side


def _heads(width: int, given: Optional[int], tower: str, notes: list[str]) -> int:
    override = _override(f"{tower}_heads")
    if override is None and tower == "vision":  # read_checkpoint(num_heads=N), `#num_heads=N`: the image tower's
        override = overrides().get("num_heads")
    heads = override or given
    if heads is None:
        if width % 64:
            flag = f"--{tower}-heads (vitx zeroshot) or {OVERRIDE_ENV[f'{tower}_heads']}"
            raise ValueError(f"the {tower} tower's width {width} is no multiple of 64, so its number of heads cannot "
                             f"be inferred (width // 64) and no config names it; set {flag}")
        heads = width // 64
        notes.append(f"{tower} heads: {heads} (width {width} // 64, OpenAI's rule; set "
                     f"{OVERRIDE_ENV[f'{tower}_heads']} otherwise)")
    if width % int(heads):
        raise ValueError(f"{heads} heads do not divide the {tower} tower's width {width}; pick a divisor")
    return int(heads)


def _act(config_act: Optional[str], default: str, why: str, notes: list[str]) -> str:
    act = _override("act") or config_act
    if act is None:
        act = default
        notes.append(f"activation: {default} ({why}; set VITX_CLIP_ACT or `vitx zeroshot --act` otherwise)")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; vitx's CLIP has {', '.join(sorted(set(HF_ACTIVATIONS.values())))}")
    return HF_ACTIVATIONS[act]


def _check_fits(config: CLIPConfig, state: dict[str, torch.Tensor], path: str, source: str) -> None:
    """Every weight of the network present, with its shape; a clear error otherwise."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIP(config).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v)})" for k, v in expected.items()
             if k in state and state[k].shape != v]
    if missing or wrong:
        raise ValueError(f"{path}: the {source} CLIP weights do not make a complete vitx CLIP: missing {missing[:6]}, "
                         f"shapes {wrong[:4]}. Is the file complete, and are the heads right (--vision-heads, "
                         "--text-heads)?")


def _unknown(left: list[str], path: str, source: str) -> None:
    if not left:
        return
    hints = {"ls_1": "layer scale", "attn_pool": "attentional pooling", "logit_bias": "SigLIP's logit bias",
             "text_projection.bias": "a text projection with bias", "cls_emb": "a text class token",
             "text.transformer": "a Hugging Face text tower", "trunk": "a timm image tower"}
    what = sorted({v for k, v in hints.items() for name in left if k in name})
    raise ValueError(f"{path}: {source} weights that vitx's CLIP has no place for ({', '.join(left[:6])}"
                     f"{', ...' if len(left) > 6 else ''}){': ' + ', '.join(what) if what else ''}. vitx reads the "
                     "plain CLIP architecture (a ViT image tower, a causal text transformer, linear projections)")


def _tokenizer(folder: str, context_length: int) -> Optional[str]:
    """The tokenizer beside the weights, as the JSON CheckpointInfo.tokenizer holds; None when there is none."""
    from data_pipelines.bpe import find_tokenizer, load_tokenizer

    found = find_tokenizer(folder) if folder else None
    return load_tokenizer(found, context_length).to_str() if found else None


def _argmax_eot(tokenizer: Optional[str], vocab_size: int) -> int:
    """The end token of a text tower that reads the highest id: the tokenizer's, else the vocabulary's last id."""
    if tokenizer is None:
        return vocab_size - 1
    from data_pipelines.tokenizer import CaptionTokenizer

    return CaptionTokenizer.from_str(tokenizer).eot_id


def _normalization(configs: dict) -> dict:
    from data_pipelines.transforms import CLIP_MEAN, CLIP_STD

    pre = configs.get("preprocessor_config.json") or {}
    oc = (configs.get("open_clip_config.json") or {}).get("preprocess_cfg") or {}
    mean = pre.get("image_mean") or oc.get("mean") or CLIP_MEAN
    std = pre.get("image_std") or oc.get("std") or CLIP_STD
    return {"mean": [float(x) for x in mean], "std": [float(x) for x in std]}


def _vision(state: dict, patch_key: str, pos: torch.Tensor, depth: int, mlp_dim: int, heads: int, act: str,
            eps: float, pre_norm: bool) -> ViTConfig:
    weight = state[patch_key]  # (D, C, P, P)
    side = _grid_side(pos.shape[-2], "the image tower's position embedding")
    return ViTConfig(variant=None, image_size=side * weight.shape[-1], patch_size=weight.shape[-1],
                     embed_dim=weight.shape[0], depth=depth, num_heads=heads, mlp_dim=mlp_dim, in_chans=weight.shape[1],
                     num_classes=0, pre_norm=pre_norm, patch_bias=False, norm_eps=eps, act=act)


# -- Hugging Face --------------------------------------------------------------------------------------------------
@register_reader
def read_hf_clip(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """A transformers CLIPModel: its folder, or its weights file with config.json beside it."""
    parts = _contents(contents, path)
    if parts is None:
        return None
    raw, configs, folder, layout = parts
    if "vision_model.embeddings.patch_embedding.weight" not in raw or "text_model.embeddings.token_embedding.weight" \
            not in raw:
        return None
    configs = configs if configs is not None else _sidecars(folder) if folder else {}
    cfg = configs.get("config.json") or {}
    if cfg.get("model_type") not in (None, "clip"):
        raise ValueError(f"{path}: a {cfg.get('model_type')} model; vitx reads Hugging Face CLIP (model_type 'clip')")
    vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    state, left = to_vitx_hf(raw)
    _unknown(left, path, "Hugging Face")
    notes: list[str] = []
    hf_default = "transformers' default, no hidden_act in config.json"
    vwidth = state["visual.patch_embed.proj.weight"].shape[0]
    vision = _vision(state, "visual.patch_embed.proj.weight", state["visual.pos_embed"][0],
                     _count(state, r"visual\.blocks\.(\d+)\.norm1\.weight"), state["visual.blocks.0.mlp.fc1.weight"].shape[0],
                     _heads(vwidth, vc.get("num_attention_heads"), "vision", notes),
                     _act(vc.get("hidden_act"), "quick_gelu", hf_default, notes), float(vc.get("layer_norm_eps", 1e-5)),
                     True)
    vocab, width = state["text.token_embedding.weight"].shape
    eos = tc.get("eos_token_id", vocab - 1)
    tokenizer = _tokenizer(folder, state["text.positional_embedding"].shape[0])
    text = TextConfig(
        vocab_size=vocab, context_length=state["text.positional_embedding"].shape[0], width=width,
        depth=_count(state, r"text\.blocks\.(\d+)\.norm1\.weight"), num_heads=_heads(width, tc.get("num_attention_heads"), "text", notes),
        mlp_dim=state["text.blocks.0.mlp.fc1.weight"].shape[0], norm_eps=float(tc.get("layer_norm_eps", 1e-5)),
        act=_act(tc.get("hidden_act"), "quick_gelu", hf_default, notes),
        # transformers reads the argmax for the configs written before eos_token_id was right (it was 2)
        eot_token_id=_argmax_eot(tokenizer, vocab) if eos == 2 else int(eos), eot_pooling="argmax" if eos == 2 else "first")
    config = CLIPConfig(embed_dim=state["text.text_projection.weight"].shape[0], vision=vision, text=text)
    _check_fits(config, state, path, "Hugging Face")
    return CheckpointInfo(path=path, source="hf-clip", family="clip", config=config, state_dict=state,
                          normalization=_normalization(configs), tokenizer=tokenizer, notes=notes)


# -- OpenAI / open_clip ------------------------------------------------------------------------------------------
def _open_clip_model_cfg(configs: dict) -> Optional[dict]:
    """open_clip's model config: open_clip_config.json's model_cfg, or a model config (ViT-B-32.json's layout)
    saved as config.json."""
    oc = configs.get("open_clip_config.json")
    if oc is not None:
        return oc.get("model_cfg", oc)
    cfg = configs.get("config.json") or {}
    return cfg if "vision_cfg" in cfg and "text_cfg" in cfg else None


@register_reader
def read_openai_clip(contents: Any, path: str) -> Optional[CheckpointInfo]:
    """OpenAI's and open_clip's CLIP with a ViT image tower (see the module docstring)."""
    parts = _contents(contents, path)
    if parts is None:
        return None
    raw, configs, folder, layout = parts
    wrapped = isinstance(contents, dict) and "state_dict" in contents
    if any(k.startswith("module.") for k in raw):  # saved from DistributedDataParallel
        raw = {k.removeprefix("module."): v for k, v in raw.items()}
    if "token_embedding.weight" not in raw or not any(k.startswith("visual.") for k in raw):
        return None
    configs = configs if configs is not None else _sidecars(folder) if folder else {}
    if "visual.conv1.weight" not in raw or "visual.class_embedding" not in raw:
        what = "a ResNet" if any(k.startswith("visual.layer1.") for k in raw) else "not a plain ViT"
        raise ValueError(f"{path}: this CLIP's image tower is {what} (RN50, timm, ...); vitx reads CLIP models with "
                         "a ViT image tower (ViT-B/32, ViT-L/14, ...)")
    model_cfg = _open_clip_model_cfg(configs)
    is_open_clip = (model_cfg is not None or layout == "open_clip" or os.path.basename(path).startswith("open_clip")
                    or wrapped)
    source = "open_clip" if is_open_clip else "openai"
    vcfg, tcfg = (model_cfg or {}).get("vision_cfg") or {}, (model_cfg or {}).get("text_cfg") or {}
    for where, cfg_, default in (("text_cfg", tcfg, "argmax"), ("vision_cfg", vcfg, "tok")):
        if cfg_.get("pool_type", default) != default:
            raise ValueError(f"{path}: open_clip's {where}.pool_type {cfg_['pool_type']!r}; vitx reads the default "
                             f"({default!r}) only")
    config_act = None
    if model_cfg is not None:
        config_act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    notes: list[str] = []
    act = _act(config_act, "gelu" if is_open_clip else "quick_gelu",
               "open_clip's default" if is_open_clip else "OpenAI's weights: no config beside the file", notes)
    state, left = to_vitx_openai(raw)
    _unknown(left, path, source)
    vwidth = state["visual.patch_embed.proj.weight"].shape[0]
    head_width = vcfg.get("head_width", 64)
    vision_heads = vwidth // head_width if "width" in vcfg else None
    vision = _vision(state, "visual.patch_embed.proj.weight", state["visual.pos_embed"][0],
                     _count(state, r"visual\.blocks\.(\d+)\.norm1\.weight"), state["visual.blocks.0.mlp.fc1.weight"].shape[0],
                     _heads(vwidth, vision_heads, "vision", notes), act, 1e-5, "visual.norm_pre.weight" in state)
    vocab, width = state["text.token_embedding.weight"].shape
    ctx = state["text.positional_embedding"].shape[0]
    tokenizer = _tokenizer(folder, ctx)
    eot = _argmax_eot(tokenizer, vocab)
    text = TextConfig(vocab_size=vocab, context_length=ctx, width=width,
                      depth=_count(state, r"text\.blocks\.(\d+)\.norm1\.weight"),
                      num_heads=_heads(width, tcfg.get("heads"), "text", notes),
                      mlp_dim=state["text.blocks.0.mlp.fc1.weight"].shape[0], act=act, eot_token_id=eot,
                      eot_pooling="argmax")
    config = CLIPConfig(embed_dim=state["text.text_projection.weight"].shape[0], vision=vision, text=text)
    _check_fits(config, state, path, source)
    if tokenizer is None:
        notes.append("no tokenizer beside the weights: give one (`vitx zeroshot --tokenizer FILE`)")
    return CheckpointInfo(path=path, source=source, family="clip", config=config, state_dict=state,
                          normalization=_normalization(configs), tokenizer=tokenizer, notes=notes)
