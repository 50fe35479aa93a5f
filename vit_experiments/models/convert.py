"""Load ViT weights written by other code bases.

- The common layout (patch_embed.proj, cls_token, pos_embed, blocks.N.attn.qkv, ..., norm, head) is ours: such a
  state dict loads with VisionTransformer.load_state_dict as it is (pretrained.py adapts one trained at another
  resolution or on another label set).
- Hugging Face `transformers` ViT checkpoints (ViTModel / ViTForImageClassification, either the 4.x names
  `vit.encoder.layer.N.attention.attention.query` or the 5.x names `vit.layers.N.attention.q_proj`) are renamed
  and their separate q, k, v projections concatenated into our fused qkv. load_hf_vit reads a local checkpoint
  directory (config.json + *.safetensors or pytorch_model.bin); nothing is downloaded.
"""

import json
import re
from pathlib import Path
from typing import Dict, Union

import torch

from vit_experiments.models.vit import ViTConfig, VisionTransformer

# (pattern on the Hugging Face name without its "vit." prefix, our name); q/k/v go to temporary names first
_HF_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.\1"),
]
# parts of Hugging Face models that have no counterpart here: ViTModel's tanh pooler (unused for classification)
# and the masked-image-modelling token
_HF_SKIPPED = [r"pooler\..*", r"embeddings\.mask_token"]
_QKV = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}


def convert_hf_vit_state_dict(hf_state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face ViT state dict -> ours. Unknown names raise, so nothing is dropped silently."""
    out, qkv, unknown = {}, {}, []
    for name, tensor in hf_state_dict.items():
        short = name.removeprefix("vit.")
        if any(re.fullmatch(p, short) for p in _HF_SKIPPED):
            continue
        for pattern, target in _HF_RENAMES:
            if re.fullmatch(pattern, short):
                new = re.sub(pattern, target, short)
                break
        else:
            unknown.append(name)
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(\w+)\.(weight|bias)", new)
        if m and m.group(2) in _QKV:
            qkv.setdefault((m.group(1), m.group(3)), {})[_QKV[m.group(2)]] = tensor
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(f"not a Hugging Face ViT state dict: unrecognised parameters {unknown[:8]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(
                f"block {layer} has only {sorted(parts)} of the q, k, v {kind}s; the checkpoint is incomplete"
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3D, ...)
    return out


def vit_config_from_hf(hf_config: dict, **overrides) -> ViTConfig:
    """A Hugging Face ViTConfig (the dict in config.json) -> our ViTConfig; overrides win."""
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r} is not supported: this ViT uses the exact (erf) GELU, 'gelu'")
    archs = hf_config.get("architectures") or []
    with_head = any("ForImageClassification" in a for a in archs) or not archs
    num_classes = (len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 0)) if with_head else 0
    kwargs = dict(
        variant=None,
        image_size=hf_config.get("image_size", 224),
        patch_size=hf_config.get("patch_size", 16),
        embed_dim=hf_config.get("hidden_size", 768),
        depth=hf_config.get("num_hidden_layers", 12),
        num_heads=hf_config.get("num_attention_heads", 12),
        mlp_dim=hf_config.get("intermediate_size", 3072),
        in_chans=hf_config.get("num_channels", 3),
        num_classes=num_classes,
        qkv_bias=hf_config.get("qkv_bias", True),
        norm_eps=hf_config.get("layer_norm_eps", 1e-12),
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def _read_weights(directory: Path) -> Dict[str, torch.Tensor]:
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors checkpoints needs `pip install safetensors`") from e
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        return state
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for b in bins:
            state.update(torch.load(b, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")


def load_hf_vit(directory: Union[str, Path], **overrides) -> VisionTransformer:
    """Build a VisionTransformer from a local Hugging Face ViT checkpoint directory (as save_pretrained writes)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; point at a directory written by save_pretrained")
    cfg = vit_config_from_hf(json.loads(config_path.read_text()), **overrides)
    model = VisionTransformer(cfg)
    model.load_state_dict(convert_hf_vit_state_dict(_read_weights(directory)))
    return model

