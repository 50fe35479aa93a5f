"""timm and big_vision files, written here in those libraries' key layouts from transformers models (whose outputs
are the reference), read through vitx's checkpoint reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.checkpoints.hf_models import hf_model, images
from vit_experiments.checkpoints import read_checkpoint
from vit_experiments.checkpoints.hf_vit import convert_hf_state_dict

TOL = dict(atol=1e-5, rtol=1e-5)


def timm_state(ref) -> dict[str, torch.Tensor]:
    """timm's key names are vitx's: the (separately tested) Hugging Face conversion gives them."""
    return {k: v.clone() for k, v in convert_hf_state_dict(ref.state_dict()).items()}


def logits(ref, x):
    with torch.no_grad():
        return ref(pixel_values=x).logits


def test_timm_vit_safetensors_with_its_config_beside(tmp_path):
    ref = hf_model("vit")
    save_file(timm_state(ref), str(tmp_path / "model.safetensors"))
    config = {"architecture": "vit_custom", "num_classes": 5, "global_pool": "token", "model_args": {"num_heads": 4},
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for path in (tmp_path / "model.safetensors", tmp_path):  # the file, or the folder (timm's hub layout)
        info = read_checkpoint(str(path))
        assert (info.source, info.config.num_heads, info.notes) == ("timm", 4, [])
        assert info.normalization == {"mean": [0.5] * 3, "std": [0.5] * 3}
        x = images()
        torch.testing.assert_close(info.build()(x), logits(ref, x), **TOL)


def test_deit_release_pth_needs_its_heads_when_they_are_not_64_wide(tmp_path):
    ref = hf_model("deit-teacher")
    torch.save({"model": timm_state(ref), "epoch": 299}, tmp_path / "deit.pth")  # as DeiT's releases
    guessed = read_checkpoint(str(tmp_path / "deit.pth"))
    assert guessed.config.num_heads == 1 and "64-wide" in guessed.notes[0] and "--num-heads" in guessed.notes[0]
    x = images()
    for info in (read_checkpoint(str(tmp_path / "deit.pth#num_heads=4")),
                 read_checkpoint(str(tmp_path / "deit.pth"), num_heads=4)):
        assert info.config.num_distill_tokens == 1 and info.config.num_heads == 4 and info.notes == []
        torch.testing.assert_close(info.build()(x), logits(ref, x), **TOL)
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        read_checkpoint(str(tmp_path / "deit.pth#num_heads=3"))


def test_heads_that_cannot_be_inferred_name_the_flag(tmp_path):
    ref = hf_model("vit", hidden_size=48, num_attention_heads=4)
    torch.save(timm_state(ref), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match=r"attention heads.*--num-heads N.*#num_heads=N"):
        read_checkpoint(str(tmp_path / "vit.pth"))
    x = images()
    torch.testing.assert_close(read_checkpoint(str(tmp_path / "vit.pth"), num_heads=4).build()(x), logits(ref, x),
                               **TOL)


def test_register_tokens_without_position_entries(tmp_path):
    """timm's register models: [cls, registers, patches], the position embedding on the patches alone
    (no_embed_class). transformers' DeiTForImageClassification is such a model with one register (its distillation
    token, which no head reads) once the prefix positions are folded into the tokens."""
    ref = hf_model("deit")
    sd = timm_state(ref)
    sd["reg_token"] = sd.pop("dist_token")
    pos = sd.pop("pos_embed")  # (1, 2 + N, D)
    sd["cls_token"], sd["reg_token"], sd["pos_embed"] = sd["cls_token"] + pos[:, :1], sd["reg_token"] + pos[:, 1:2], \
        pos[:, 2:].clone()
    torch.save(sd, tmp_path / "reg.bin")
    info = read_checkpoint(str(tmp_path / "reg.bin#num_heads=4"))
    cfg = info.config
    assert (cfg.num_reg_tokens, cfg.num_prefix_tokens, cfg.image_size) == (1, 2, 32)
    assert any("no_embed_class" in n for n in info.notes)
    x = images()
    torch.testing.assert_close(info.build()(x), logits(ref, x), **TOL)


def test_average_pooling_with_fc_norm_and_norm_pre(tmp_path):
    """timm's global_pool="avg": no final norm on the tokens, the mean of the patch tokens, then fc_norm; and
    norm_pre, a LayerNorm on the embeddings before the blocks. The reference: transformers' ViTModel with a
    LayerNorm hooked onto its embeddings and its last block's output pooled the timm way."""
    ref = hf_model("vit-model")
    sd = timm_state(ref)
    g = torch.Generator().manual_seed(2)
    pre_w, pre_b = 1 + 0.1 * torch.randn(64, generator=g), 0.1 * torch.randn(64, generator=g)
    head_w, head_b = 0.1 * torch.randn(5, 64, generator=g), 0.1 * torch.randn(5, generator=g)
    sd.update({"norm_pre.weight": pre_w, "norm_pre.bias": pre_b, "head.weight": head_w, "head.bias": head_b,
               "fc_norm.weight": sd.pop("norm.weight"), "fc_norm.bias": sd.pop("norm.bias")})
    torch.save(sd, tmp_path / "gap.pth")
    info = read_checkpoint(str(tmp_path / "gap.pth#num_heads=4"))
    assert (info.config.pool, info.config.fc_norm, info.config.pre_norm) == ("avg", True, True)
    x = images()
    hook = ref.embeddings.register_forward_hook(lambda m, i, out: F.layer_norm(out, (64,), pre_w, pre_b, 1e-6))
    try:
        with torch.no_grad():
            last = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # (B, T, D), before layernorm
    finally:
        hook.remove()
    pooled = F.layer_norm(last[:, 1:].mean(1), (64,), ref.layernorm.weight, ref.layernorm.bias, 1e-6)
    torch.testing.assert_close(info.build()(x), F.linear(pooled, head_w, head_b), **TOL)


def _jax_arrays(ref, layout: str) -> dict[str, np.ndarray]:
    """A transformers ViT's weights under the names and shapes of the JAX code bases: "augreg" (vision_transformer's
    .npz), "big_vision" (params/, no position for the class token), "scanned" (big_vision with the blocks stacked)."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    D, heads = 64, 4
    p = "" if layout == "augreg" else "params/"
    mha, mlp, ln2 = (1, 3, 2) if layout == "augreg" else (0, 0, 1)
    e = "vit.embeddings."
    w = {f"{p}embedding/kernel": sd[e + "patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),  # HWIO
         f"{p}embedding/bias": sd[e + "patch_embeddings.projection.bias"],
         f"{p}Transformer/encoder_norm/scale": sd["vit.layernorm.weight"],
         f"{p}Transformer/encoder_norm/bias": sd["vit.layernorm.bias"],
         f"{p}head/kernel": sd["classifier.weight"].T, f"{p}head/bias": sd["classifier.bias"]}
    pos, cls = sd[e + "position_embeddings"], sd[e + "cls_token"]
    if layout == "augreg":
        w[f"{p}cls"], w[f"{p}Transformer/posembed_input/pos_embedding"] = cls, pos
    else:  # big_vision adds the position embedding to the patches only
        w[f"{p}cls"], w[f"{p}pos_embedding"] = cls + pos[:, :1], pos[:, 1:]
    blocks = []
    for i in range(2):
        L = f"vit.layers.{i}."
        a = f"MultiHeadDotProductAttention_{mha}/"
        b = {"LayerNorm_0/scale": sd[L + "layernorm_before.weight"], "LayerNorm_0/bias": sd[L + "layernorm_before.bias"],
             f"LayerNorm_{ln2}/scale": sd[L + "layernorm_after.weight"],
             f"LayerNorm_{ln2}/bias": sd[L + "layernorm_after.bias"],
             a + "out/kernel": sd[L + "attention.o_proj.weight"].T.reshape(heads, D // heads, D),
             a + "out/bias": sd[L + "attention.o_proj.bias"]}
        for n, hf in (("query", "q"), ("key", "k"), ("value", "v")):
            b[a + f"{n}/kernel"] = sd[L + f"attention.{hf}_proj.weight"].T.reshape(D, heads, D // heads)
            b[a + f"{n}/bias"] = sd[L + f"attention.{hf}_proj.bias"].reshape(heads, D // heads)
        for r, fc in enumerate(("fc1", "fc2")):
            b[f"MlpBlock_{mlp}/Dense_{r}/kernel"] = sd[L + f"mlp.{fc}.weight"].T
            b[f"MlpBlock_{mlp}/Dense_{r}/bias"] = sd[L + f"mlp.{fc}.bias"]
        blocks.append(b)
    for name in blocks[0]:
        if layout == "scanned":
            w[f"{p}Transformer/encoderblock/{name}"] = np.stack([b[name] for b in blocks])
        else:
            for i, b in enumerate(blocks):
                w[f"{p}Transformer/encoderblock_{i}/{name}"] = b[name]
    return w


@pytest.mark.parametrize("layout", ["augreg", "big_vision", "scanned"])
def test_big_vision_npz(layout, tmp_path):
    ref = hf_model("vit", hidden_act="gelu_pytorch_tanh")  # JAX's default GELU is the tanh approximation
    if ".layers." not in " ".join(ref.state_dict()):
        pytest.skip("this transformers names its layers differently")
    np.savez(tmp_path / "vit.npz", **_jax_arrays(ref, layout))
    info = read_checkpoint(str(tmp_path / "vit.npz"))
    assert (info.source, info.config.num_heads, info.config.act) == ("big_vision", 4, "gelu_tanh")
    x = images()
    torch.testing.assert_close(info.build()(x), logits(ref, x), **TOL)


def test_big_vision_pre_logits_leave_the_backbone(tmp_path):
    ref = hf_model("vit", hidden_act="gelu_pytorch_tanh")
    if ".layers." not in " ".join(ref.state_dict()):
        pytest.skip("this transformers names its layers differently")
    w = _jax_arrays(ref, "augreg")
    w.update({"pre_logits/kernel": np.zeros((64, 64), np.float32), "pre_logits/bias": np.zeros(64, np.float32)})
    np.savez(tmp_path / "vit21k.npz", **w)
    info = read_checkpoint(str(tmp_path / "vit21k.npz"))
    assert info.config.num_classes == 0 and "pre_logits" in info.notes[0]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(info.build().forward_features(x),
                                   ref.vit(pixel_values=x).last_hidden_state, **TOL)


def test_big_vision_without_a_class_token_is_average_pooled(tmp_path):
    """big_vision's "gap" models: no cls, the position embedding on the patches, the encoder norm on every token
    and the mean of them all under the head."""
    w = _jax_arrays(hf_model("vit", hidden_act="gelu_pytorch_tanh"), "big_vision")
    del w["params/cls"]
    np.savez(tmp_path / "gap.npz", **w)
    info = read_checkpoint(str(tmp_path / "gap.npz"))
    cfg = info.config
    assert (cfg.class_token, cfg.pool, cfg.fc_norm, cfg.num_prefix_tokens, cfg.image_size) == (False, "avg", False, 0, 32)
    model, x = info.build(), images()
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 16, D) after the encoder norm
        torch.testing.assert_close(model(x), model.head(tokens.mean(1)), **TOL)
        assert tokens.shape == (3, 16, 64)
