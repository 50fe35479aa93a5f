"""Tiny Hugging Face ViT / DeiT models with random weights: the references the imported models must match."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

SIZE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
            patch_size=8, layer_norm_eps=1e-6, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
KINDS = {
    "vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
    "vit-model": (transformers.ViTConfig, transformers.ViTModel),
    "deit-teacher": (transformers.DeiTConfig, transformers.DeiTForImageClassificationWithTeacher),
    "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification),
    "deit-model": (transformers.DeiTConfig, transformers.DeiTModel),
}


def hf_model(kind: str, seed: int = 0, **overrides):
    """A transformers model of `kind` in eval mode, every parameter random (a swapped norm or bias would show)."""
    torch.manual_seed(seed)
    config_cls, model_cls = KINDS[kind]
    config = config_cls(**{**SIZE, "num_labels": 5, "hidden_act": "gelu", **overrides})
    config._attn_implementation = "eager"  # so that it can return its attention probabilities
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
