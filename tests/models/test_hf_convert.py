"""Equality with Hugging Face transformers' ViTForImageClassification after converting its weights by name."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vit_experiments.models import (  # noqa: E402
    VisionTransformer,
    convert_hf_vit_state_dict,
    load_hf_vit,
    vit_config_from_hf,
)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"  # so that it can return its attention probabilities
    model = transformers.ViTForImageClassification(config).eval()
    with torch.no_grad():  # random values everywhere, so that a swapped norm or bias would show
        for name, p in model.named_parameters():
            p.normal_(1.0 if "layernorm" in name and name.endswith("weight") else 0.0, 0.1)
    return model


def _ours(hf_model) -> VisionTransformer:
    model = VisionTransformer(vit_config_from_hf(hf_model.config.to_dict()))
    model.load_state_dict(convert_hf_vit_state_dict(hf_model.state_dict()))  # strict: every name maps
    return model.eval()


def test_logits_and_attention_equal_transformers(hf_model):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    ours = _ours(hf_model)
    with torch.no_grad():
        ref = hf_model(pixel_values=x, output_attentions=True)
        logits = ours(x)
        _, attentions = ours.forward_features(x, return_attention=True)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    assert len(attentions) == len(ref.attentions) == 2
    for a, b in zip(attentions, ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _legacy_names(state_dict):
    """Rename to the transformers 4.x layout (vit.encoder.layer.N.attention.attention.query ...)."""
    rules = [
        (r"vit\.layers\.(\d+)\.attention\.q_proj", r"vit.encoder.layer.\1.attention.attention.query"),
        (r"vit\.layers\.(\d+)\.attention\.k_proj", r"vit.encoder.layer.\1.attention.attention.key"),
        (r"vit\.layers\.(\d+)\.attention\.v_proj", r"vit.encoder.layer.\1.attention.attention.value"),
        (r"vit\.layers\.(\d+)\.attention\.o_proj", r"vit.encoder.layer.\1.attention.output.dense"),
        (r"vit\.layers\.(\d+)\.mlp\.fc1", r"vit.encoder.layer.\1.intermediate.dense"),
        (r"vit\.layers\.(\d+)\.mlp\.fc2", r"vit.encoder.layer.\1.output.dense"),
        (r"vit\.layers\.", r"vit.encoder.layer."),
    ]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def test_legacy_and_current_layouts_convert_alike(hf_model):
    current = hf_model.state_dict()
    if not any(".layers." in k for k in current):  # this transformers writes the 4.x names itself
        pytest.skip("installed transformers already uses the 4.x layout, covered by the equality test")
    legacy = _legacy_names(current)
    assert any("attention.attention.query" in k for k in legacy)
    a, b = convert_hf_vit_state_dict(current), convert_hf_vit_state_dict(legacy)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_hf_vit_from_a_saved_directory(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = load_hf_vit(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf_model(pixel_values=x).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_vit(tmp_path / "missing")


def test_unrecognised_names_are_refused(hf_model):
    sd = dict(hf_model.state_dict())
    sd["vit.something.else"] = torch.zeros(1)
    with pytest.raises(ValueError, match="vit.something.else"):
        convert_hf_vit_state_dict(sd)
    with pytest.raises(ValueError, match="exact"):
        vit_config_from_hf({**hf_model.config.to_dict(), "hidden_act": "gelu_new"})
