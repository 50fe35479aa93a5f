"""VisionTransformer: variants, shapes, gradients, attention maps, resolution changes, DeiT heads, errors."""

import dataclasses

import pytest
import torch

from vit_experiments.models import VARIANTS, ViTConfig, VisionTransformer, build_vit
from vit_experiments.models.pos_embed import sincos_2d_pos_embed


def tiny(**overrides) -> VisionTransformer:
    kw = dict(variant=None, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
    kw.update(overrides)
    return VisionTransformer(ViTConfig(**kw))


# ---- variants ------------------------------------------------------------------------------------------------

# parameters at 224 px with 1000 classes (the common reference counts: 5.7M, 22M, 86M, 304M, 632M)
PARAM_COUNTS = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "L/16": 304_326_632, "H/14": 632_045_800}


@pytest.mark.parametrize("variant", list(PARAM_COUNTS))
def test_variant_param_counts_and_shapes_on_meta(variant):
    with torch.device("meta"):  # no memory, no compute: shapes only
        model = build_vit(variant)
        logits = model(torch.empty(2, 3, 224, 224))
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[variant]
    assert logits.shape == (2, 1000)
    depth, dim, mlp, heads = VARIANTS[variant.split("/")[0]]
    cfg = model.cfg
    assert (cfg.depth, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads) == (depth, dim, mlp, heads)
    assert len(model.blocks) == depth and model.blocks[0].mlp.fc1.out_features == mlp


@pytest.mark.parametrize("variant", ["Ti/16", "S/8", "B/32", "L/16", "H/14"])
def test_every_variant_runs_at_small_size(variant):
    torch.manual_seed(0)
    patch = int(variant.split("/")[1])
    model = build_vit(variant, depth=1, image_size=2 * patch, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 2 * patch, 2 * patch))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_variant_spelling_and_overrides():
    assert ViTConfig("ViT-b/16").embed_dim == 768
    cfg = ViTConfig("S/8", image_size=64, depth=3, num_classes=7)
    assert (cfg.patch_size, cfg.depth, cfg.embed_dim, cfg.grid_size, cfg.num_prefix_tokens) == (8, 3, 384, (8, 8), 1)
    assert dataclasses.replace(cfg) == cfg  # re-validating a resolved config changes nothing
    assert ViTConfig(None, patch_size=4, embed_dim=24, depth=1, num_heads=3).mlp_dim == 96


def test_custom_size_shapes():
    torch.manual_seed(0)
    model = tiny(image_size=48, patch_size=16, in_chans=1, num_classes=4)
    x = torch.randn(3, 1, 48, 48)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 9, 32)
    assert model.forward_head(tokens).shape == (3, 4)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, 32)
    assert tiny(num_classes=0)(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # features only


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["X/16", "B", "B/x", "Huge/14"])
def test_unknown_variant_lists_valid_ones(bad):
    with pytest.raises(ValueError, match="Ti, S, B, L, H") as e:
        ViTConfig(bad)
    assert repr(bad) in str(e.value)


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="image_size 100.*patch_size 16"):
        ViTConfig("B/16", image_size=100)
    with pytest.raises(ValueError, match="embed_dim, depth"):
        ViTConfig(None, patch_size=16)
    with pytest.raises(ValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        ViTConfig(None, patch_size=8, embed_dim=30, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="class_token=True"):
        ViTConfig("Ti/16", class_token=False)
    with pytest.raises(ValueError, match="'token' or 'avg'"):
        ViTConfig("Ti/16", pool="max")
    with pytest.raises(ValueError, match="num_distill_tokens"):
        ViTConfig("Ti/16", num_distill_tokens=2)


def test_wrong_input_size_points_at_set_image_size():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*set_image_size"):
        model(torch.randn(1, 3, 48, 48))


# ---- numerics and gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pool": "avg"},  # the class token still gets a gradient: patch tokens attend to it
        {"pool": "avg", "class_token": False},
        {"num_distill_tokens": 1},
        {"pre_norm": True, "qkv_bias": False, "patch_bias": False},
        {"pos_embed_type": "sincos"},
    ],
    ids=["token", "avg", "avg-no-cls", "distilled", "pre-norm", "sincos"],
)
def test_finite_outputs_and_every_parameter_gets_a_gradient(overrides):
    torch.manual_seed(0)
    model = tiny(**overrides)
    out = model(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name == "pos_embed" and overrides.get("pos_embed_type") == "sincos"
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"


@pytest.mark.parametrize("overrides", [{}, {"num_distill_tokens": 1}, {"class_token": False}])
def test_avg_pooling_averages_patch_tokens_only(overrides):
    torch.manual_seed(0)
    model = tiny(pool="avg", **overrides).eval()
    tokens = model.forward_features(torch.randn(2, 3, 32, 32))
    p = model.cfg.num_prefix_tokens
    assert tokens.shape[1] == p + 16
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, p:].mean(1))
    torch.testing.assert_close(tiny().eval().forward_head(tokens, pre_logits=True), tokens[:, 0])


def test_drop_path_active_in_train_identity_in_eval():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.5, depth=4)
    plain = tiny(depth=4)
    plain.load_state_dict(model.state_dict())
    rates = [b.drop_path1.drop_prob for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5 and rates == sorted(rates)  # linear in depth
    x = torch.randn(8, 3, 32, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    assert not torch.allclose(model(x), plain(x))


def test_return_attention_matches_fast_path():
    torch.manual_seed(0)
    model = tiny(depth=3, num_distill_tokens=1).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = model.forward_features(x)
    tokens, attentions = model.forward_features(x, return_attention=True)
    torch.testing.assert_close(tokens, fast, atol=1e-5, rtol=1e-5)
    T = 2 + 16
    assert len(attentions) == 3
    for a in attentions:
        assert a.shape == (2, 4, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, T))
    tokens2, attentions2, logit_maxes = model.forward_features(x, return_attention=True, return_logit_max=True)
    torch.testing.assert_close(tokens2, tokens)
    assert len(logit_maxes) == 3 and all(m.shape == (2, 4) for m in logit_maxes)
    with torch.no_grad():  # the first block's logits by hand: scaled q.k of its normed input
        h = model.blocks[0].norm1(model.norm_pre(model._embed(x)))  # (B, T, D)
        q, k, _ = model.blocks[0].attn.qkv(h).reshape(2, T, 3, 4, -1).permute(2, 0, 3, 1, 4)  # (B, heads, T, d)
        ref = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).amax(dim=(-2, -1))  # (B, heads)
    torch.testing.assert_close(logit_maxes[0], ref, atol=1e-5, rtol=1e-5)


# ---- DeiT heads ----------------------------------------------------------------------------------------------


def test_distilled_model_has_two_heads_and_averages_them():
    torch.manual_seed(0)
    model = tiny(num_distill_tokens=1).eval()
    assert model.cfg.num_prefix_tokens == 2 and model.pos_embed.shape == (1, 2 + 16, 32)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    cls_logits, dist_logits = model.forward_distill_heads(tokens)
    assert cls_logits.shape == dist_logits.shape == (3, 10)
    assert not torch.allclose(cls_logits, dist_logits)
    torch.testing.assert_close(model.forward_head(tokens), cls_logits)
    torch.testing.assert_close(model.head_dist(tokens[:, 1]), dist_logits)  # the token after cls
    torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)
    with pytest.raises(ValueError, match="num_distill_tokens=1"):
        tiny().forward_distill_heads(tokens)


# ---- layout, heads, resolution -------------------------------------------------------------------------------


def test_state_dict_uses_the_common_layout():
    block = {f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")}
    common = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
              "norm.bias", "head.weight", "head.bias"}
    assert set(tiny(depth=1).state_dict()) == common | block
    distilled = set(tiny(depth=1, num_distill_tokens=1, pre_norm=True).state_dict())
    assert distilled == common | block | {"dist_token", "head_dist.weight", "head_dist.bias", "norm_pre.weight",
                                          "norm_pre.bias"}
    assert tiny(num_distill_tokens=1).no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    assert tiny(pool="avg", class_token=False).no_weight_decay() == {"pos_embed"}


def test_reset_classifier_zero_inits_new_heads():
    torch.manual_seed(0)
    model = tiny(num_distill_tokens=1)
    model.reset_classifier(5)
    assert model.cfg.num_classes == 5
    for head in (model.head, model.head_dist):
        assert head.out_features == 5 and head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    assert torch.all(model(torch.randn(2, 3, 32, 32)) == 0)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert torch.all(tiny(head_init_zero=True)(torch.randn(2, 3, 32, 32)) == 0)


def test_resample_to_same_size_is_identity():
    model = tiny(num_distill_tokens=1)
    before = model.pos_embed.detach().clone()
    param = model.pos_embed
    model.resample_pos_embed(32)
    assert model.pos_embed is param and torch.equal(model.pos_embed, before)


@pytest.mark.parametrize("pos_embed_type", ["learn", "sincos"])
def test_resample_to_new_size(pos_embed_type):
    torch.manual_seed(0)
    model = tiny(num_distill_tokens=1, pos_embed_type=pos_embed_type).eval()
    prefix = model.pos_embed[:, :2].detach().clone()
    model.set_image_size(48)
    assert model.cfg.image_size == 48 and model.cfg.grid_size == (6, 6)
    assert model.pos_embed.shape == (1, 2 + 36, 32)
    assert model.pos_embed.requires_grad == (pos_embed_type == "learn")
    assert torch.equal(model.pos_embed[:, :2], prefix)
    if pos_embed_type == "sincos":
        torch.testing.assert_close(model.pos_embed.detach(), sincos_2d_pos_embed(32, (6, 6), 2))
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="48, 48"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size 50 is not divisible by patch_size 8"):
        model.set_image_size(50)

