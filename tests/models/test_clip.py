"""CLIP model: the two towers, the end-of-text readout, the temperature, and the loss against its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vit_experiments.losses import contrastive_loss, gather_features
from vit_experiments.models.clip import CLIP, CLIPConfig
from vit_experiments.models.text import TextConfig, TextTransformer
from vit_experiments.models.vit import ViTConfig, VisionTransformer

EOT = 2


def tiny_config(**overrides) -> CLIPConfig:
    vision = ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                       num_classes=0, pre_norm=True, patch_bias=False)
    text = TextConfig(vocab_size=50, context_length=12, width=32, depth=2, num_heads=2)
    return CLIPConfig(embed_dim=16, vision=vision, text=text, **overrides)


def captions(B: int = 4, T: int = 12, seed: int = 0) -> torch.Tensor:
    """(B, T) ids: start token, random tokens, the end token at varying places, then padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = 2 + b % (T - 3)
        ids[b, 0] = 1
        ids[b, 1 : n + 1] = torch.randint(3, 50, (n,), generator=g)
        ids[b, n + 1] = EOT
    return ids


@pytest.fixture
def model() -> CLIP:
    torch.manual_seed(0)
    return CLIP(tiny_config()).eval()


def test_towers_and_unit_embeddings(model):
    assert isinstance(model.visual, VisionTransformer)
    assert model.visual.cfg.num_classes == 0 and isinstance(model.visual.head, torch.nn.Identity)
    assert model.visual.patch_embed.proj.bias is None  # CLIP's patch projection has no bias
    assert model.image_projection.bias is None and model.text.text_projection.bias is None
    img, txt, scale = model(torch.randn(3, 3, 16, 16), captions(3))
    assert img.shape == txt.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(math.log(1 / 0.07))


def test_image_feature_is_the_projected_class_token_after_the_final_norm(model):
    x = torch.randn(2, 3, 16, 16)
    tokens = model.visual.forward_features(x)  # (B, T, D) after the ViT's final LayerNorm
    expected = F.normalize(tokens[:, 0] @ model.image_projection.weight.T, dim=-1)
    torch.testing.assert_close(model.encode_image(x), expected)


def test_a_classification_head_in_the_config_is_dropped():
    cfg = tiny_config()
    cfg2 = CLIPConfig(embed_dim=16, vision=ViTConfig(variant=None, image_size=16, patch_size=8, embed_dim=32, depth=1,
                                                     num_heads=2, num_classes=10), text=cfg.text)
    assert cfg2.vision.num_classes == 0


def test_text_feature_is_read_at_the_end_token_and_ignores_padding(model):
    ids = captions(4)
    out = model.encode_text(ids)
    noisy = ids.clone()
    for b in range(4):
        eot = int((ids[b] == EOT).nonzero()[0])
        noisy[b, eot + 1 :] = torch.randint(3, 50, (ids.shape[1] - eot - 1,))  # garbage after the end token
    torch.testing.assert_close(model.encode_text(noisy), out)
    changed = ids.clone()
    changed[:, 1] = (changed[:, 1] + 1 - 3) % 47 + 3  # a different first word
    assert not torch.allclose(model.encode_text(changed), out)
    positions = (ids == EOT).int().argmax(dim=1)
    torch.testing.assert_close(F.normalize(model.text(ids, eot_positions=positions), dim=-1), out)


def test_text_tower_is_causal():
    torch.manual_seed(0)
    tower = TextTransformer(TextConfig(vocab_size=50, context_length=10, width=32, depth=2, num_heads=2), 16).eval()
    ids = torch.randint(3, 50, (2, 10))
    later = ids.clone()
    later[:, 6:] = torch.randint(3, 50, (2, 4))
    torch.testing.assert_close(tower.forward_features(ids)[:, :6], tower.forward_features(later)[:, :6])


def test_missing_end_token_and_too_long_input_are_clear_errors(model):
    with pytest.raises(ValueError, match="end-of-text"):
        model.encode_text(torch.full((2, 12), 5))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.full((2, 13), EOT))


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = CLIP(tiny_config())
    img, txt, scale = model(torch.randn(4, 3, 16, 16), captions(4))
    loss = contrastive_loss(img, txt, scale)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()


def test_loss_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = torch.tensor(2.3)
    logits = t.exp() * img @ txt.T  # (B, B)
    labels = torch.arange(6)
    # the paper's Fig. 3: (CE over rows + CE over columns) / 2, written out as log-softmax diagonals
    expected = -(logits.log_softmax(1).diagonal().mean() + logits.log_softmax(0).diagonal().mean()) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, t), expected)
    torch.testing.assert_close(contrastive_loss(img, txt, t), (F.cross_entropy(logits, labels) +
                                                               F.cross_entropy(logits.T, labels)) / 2)
    assert gather_features(img) is img  # no process group: nothing to gather


def test_loss_is_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    t = torch.tensor(math.log(100.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(img.bfloat16(), txt.bfloat16(), t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, contrastive_loss(img.bfloat16().float(), txt.bfloat16().float(), t))


def test_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"\(B, E\)"):
        contrastive_loss(torch.randn(4, 8), torch.randn(3, 8), torch.tensor(1.0))


def test_clamp_holds_after_steps_with_a_huge_learning_rate(model):
    opt = torch.optim.SGD([model.logit_scale], lr=1e6)
    for _ in range(3):
        (-model.logit_scale).backward()  # a loss that always pushes the temperature up
        opt.step()
        opt.zero_grad()
        assert model.logit_scale.item() > math.log(100.0)  # the step overshot ...
        model.clamp_logit_scale()
        assert model.logit_scale.item() == pytest.approx(math.log(100.0))  # ... and the clamp brought it back


def test_bad_configs_say_what_to_do():
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(width=30, num_heads=4)
    with pytest.raises(ValueError, match="ceiling"):
        tiny_config(init_logit_scale=10.0)
