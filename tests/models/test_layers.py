"""Attention, DropPath, Block and PatchEmbed against explicit reference computations."""

import pytest
import torch
import torch.nn.functional as F

from vit_experiments.models.layers import Attention, Block, DropPath, PatchEmbed


def _reference_attention(attn: Attention, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-head loop written from the paper's definition, independent of the module's reshapes."""
    B, T, D = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(D, dim=-1)  # each (B, T, D)
    heads = []
    for i in range(h):
        qi, ki, vi = (t[..., i * d : (i + 1) * d] for t in (q, k, v))  # (B, T, d)
        p = torch.softmax(qi @ ki.transpose(1, 2) / d**0.5 + bias, dim=-1)  # (B, T, T)
        heads.append(p @ vi)
    return attn.proj(torch.cat(heads, dim=-1))  # (B, T, D)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float", "bool+causal"])
def test_attention_paths_agree_with_reference(mask_kind):
    torch.manual_seed(0)
    B, T, D = 2, 7, 16
    attn = Attention(D, num_heads=4).eval()
    x = torch.randn(B, T, D)
    causal = mask_kind in ("causal", "bool+causal")
    bias = torch.zeros(T, T)
    if causal:
        bias = bias.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    mask = None
    if mask_kind.startswith("bool"):
        mask = torch.ones(T, T, dtype=torch.bool)
        mask[:, 5:] = False  # the last keys are padding
        bias = bias.masked_fill(~mask, float("-inf"))
    elif mask_kind == "float":
        mask = torch.randn(T, T)
        bias = bias + mask

    fast = attn(x, attn_mask=mask, is_causal=causal)
    slow, probs = attn(x, attn_mask=mask, is_causal=causal, return_attention=True)
    ref = _reference_attention(attn, x, bias)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slow, ref, atol=1e-5, rtol=1e-5)
    assert probs.shape == (B, 4, T, T)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, 4, T))
    if causal:
        assert torch.all(probs.masked_select(torch.ones(T, T, dtype=torch.bool).triu(1)) == 0)


def test_attention_returns_the_largest_pre_softmax_logit():
    torch.manual_seed(0)
    B, T, D = 2, 6, 16
    attn = Attention(D, num_heads=4).eval()
    x = torch.randn(B, T, D)
    q, k, _ = attn.qkv(x).split(D, dim=-1)  # each (B, T, D)
    ref = torch.stack([(q[..., i * 4:(i + 1) * 4] @ k[..., i * 4:(i + 1) * 4].transpose(1, 2) / 2).amax(dim=(1, 2))
                       for i in range(4)], dim=1)  # (B, heads): head_dim 4, scale 1/2
    out, probs, logit_max = attn(x, return_attention=True, return_logit_max=True)
    torch.testing.assert_close(logit_max, ref)
    out2, probs2 = attn(x, return_attention=True)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(probs, probs2)
    block = Block(D, 4, 32).eval()
    y, p, m = block(x, return_attention=True, return_logit_max=True)
    assert p.shape == (B, 4, T, T) and m.shape == (B, 4)
    torch.testing.assert_close(y, block(x))
    with pytest.raises(ValueError, match="return_attention"):
        attn(x, return_logit_max=True)


def test_attention_width_must_divide_heads():
    with pytest.raises(ValueError, match="num_heads 5"):
        Attention(16, num_heads=5)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, attn_drop=0.5)
    x = torch.randn(2, 5, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    _, probs = attn(x, return_attention=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5))  # returned before dropout
    attn.train()
    assert not torch.allclose(attn(x), attn.eval()(x))


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(256, 3, 4)
    y = dp.train()(x)
    per_sample = y.flatten(1)
    # each sample is either dropped (0) or kept and rescaled by 1/(1-p) (2), uniformly over its elements
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.3 < (per_sample[:, 0] == 0).float().mean() < 0.7
    assert dp.eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)


def test_block_attention_path_matches_fast_path():
    torch.manual_seed(0)
    block = Block(32, num_heads=4, mlp_dim=64).eval()
    x = torch.randn(3, 9, 32)
    y, probs = block(x, return_attention=True)
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)
    assert probs.shape == (3, 4, 9, 9)
    y_causal, probs_causal = block(x, is_causal=True, return_attention=True)
    torch.testing.assert_close(block(x, is_causal=True), y_causal, atol=1e-5, rtol=1e-5)
    assert probs_causal[..., 0, 1:].abs().max() == 0  # the first token sees only itself


def test_patch_embed_is_a_linear_map_of_flattened_patches_in_row_major_order():
    torch.manual_seed(0)
    P, C, D = 4, 3, 8
    pe = PatchEmbed(P, C, D)
    x = torch.randn(2, C, 8, 12)
    out = pe(x)
    assert out.shape == (2, (8 // P) * (12 // P), D)
    patches = x.unfold(2, P, P).unfold(3, P, P)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, -1, C * P * P)  # (B, gh*gw, C*P*P) row-major
    ref = F.linear(patches, pe.proj.weight.reshape(D, -1), pe.proj.bias)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
