"""Hugging Face ViT and DeiT folders written by save_pretrained, read through vitx's checkpoint reader, give the
outputs of transformers' own models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.checkpoints.hf_models import hf_model, images
from vit_experiments.checkpoints import read_checkpoint
from vit_experiments.checkpoints.hf_vit import convert_hf_state_dict

TOL = dict(atol=1e-5, rtol=1e-5)


def test_vit_logits_and_attention_equal_transformers(tmp_path):
    ref = hf_model("vit", hidden_act="gelu_pytorch_tanh")
    ref.save_pretrained(tmp_path)
    info = read_checkpoint(str(tmp_path))
    assert (info.source, info.family) == ("hf-vit", "vit")
    cfg = info.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (2, 64, 4, 96, 8, 32)
    assert (cfg.num_classes, cfg.act, cfg.norm_eps, cfg.num_prefix_tokens) == (5, "gelu_tanh", 1e-6, 1)
    model, x = info.build(), images()
    with torch.no_grad():
        out = ref(pixel_values=x, output_attentions=True)
        _, attentions = model.forward_features(x, return_attention=True)
        torch.testing.assert_close(model(x), out.logits, **TOL)
    assert len(attentions) == len(out.attentions) == 2
    for a, b in zip(attentions, out.attentions):
        torch.testing.assert_close(a, b, **TOL)


def test_deit_with_teacher_has_both_heads(tmp_path):
    ref = hf_model("deit-teacher")
    ref.save_pretrained(tmp_path)
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}, f)
    info = read_checkpoint(str(tmp_path))
    assert info.config.num_distill_tokens == 1 and info.config.num_prefix_tokens == 2
    assert info.normalization == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    model, x = info.build(), images()
    with torch.no_grad():
        out = ref(pixel_values=x)
        cls_logits, dist_logits = model.forward_distill_heads(model.forward_features(x))
        torch.testing.assert_close(cls_logits, out.cls_logits, **TOL)
        torch.testing.assert_close(dist_logits, out.distillation_logits, **TOL)
        torch.testing.assert_close(model(x), out.logits, **TOL)


def test_deit_for_classification_reads_its_distillation_token_as_a_register(tmp_path):
    ref = hf_model("deit", id2label={i: f"class{i}" for i in range(5)})
    ref.save_pretrained(tmp_path)
    info = read_checkpoint(str(tmp_path))
    assert (info.config.num_distill_tokens, info.config.num_reg_tokens, info.config.num_prefix_tokens) == (0, 1, 2)
    assert info.class_names == [f"class{i}" for i in range(5)] and any("register" in n for n in info.notes)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(info.build()(x), ref(pixel_values=x).logits, **TOL)


@pytest.mark.parametrize("kind", ["vit-model", "deit-model"])
def test_models_without_a_head_give_transformers_last_hidden_state(kind, tmp_path):
    ref = hf_model(kind)
    ref.save_pretrained(tmp_path)
    info = read_checkpoint(str(tmp_path))
    assert info.config.num_classes == 0 and info.class_names is None  # the pooler is not imported
    assert info.config.num_distill_tokens == (kind == "deit-model")
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(info.build().forward_features(x), ref(pixel_values=x).last_hidden_state, **TOL)


def test_current_and_legacy_names_convert_alike():
    current = hf_model("vit").state_dict()
    legacy = {}
    for k, v in current.items():  # transformers 4.x names, as save_pretrained writes them
        k = re.sub(r"vit\.layers\.(\d+)\.attention\.([qkv])_proj",
                   lambda m: f"vit.encoder.layer.{m[1]}.attention.attention."
                             f"{dict(q='query', k='key', v='value')[m[2]]}", k)
        k = re.sub(r"vit\.layers\.(\d+)\.attention\.o_proj", r"vit.encoder.layer.\1.attention.output.dense", k)
        k = re.sub(r"vit\.layers\.(\d+)\.mlp\.fc1", r"vit.encoder.layer.\1.intermediate.dense", k)
        k = re.sub(r"vit\.layers\.(\d+)\.mlp\.fc2", r"vit.encoder.layer.\1.output.dense", k)
        legacy[k.replace("vit.layers.", "vit.encoder.layer.")] = v
    assert legacy.keys() != current.keys()
    a, b = convert_hf_state_dict(current), convert_hf_state_dict(legacy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_parameters_and_activations_are_refused(tmp_path):
    ref = hf_model("vit")
    sd = dict(ref.state_dict())
    sd["vit.something.else"] = torch.zeros(1)
    with pytest.raises(ValueError, match="vit.something.else"):
        convert_hf_state_dict(sd)
    ref.config.hidden_act = "relu"
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        read_checkpoint(str(tmp_path))
