"""Attention rollout (Abnar & Zuidema 2020) on attention maps with a closed-form answer."""
import numpy as np
import pytest
import torch

from vit_experiments.analysis import attention_rollout


def test_identity_attention_keeps_everything_on_the_class_token():
    T = 1 + 12
    attn = [torch.eye(T).expand(2, 3, T, T)] * 4
    maps = attention_rollout(attn, (3, 4), num_prefix_tokens=1)
    assert maps.shape == (2, 3, 4) and maps.dtype == torch.float32
    assert torch.equal(maps, torch.zeros(2, 3, 4))


@pytest.mark.parametrize("layers,expected", [(1, 1 / 2), (2, 3 / 4), (3, 7 / 8)])
def test_uniform_attention_gives_a_uniform_known_map(layers, expected):
    # (U + I) / 2 with U uniform: its L-th power is (1 - 2^-L) U + 2^-L I, so each patch gets (1 - 2^-L) / T
    p, grid = 2, (4, 4)
    T = p + 16
    attn = [torch.full((1, 2, T, T), 1.0 / T)] * layers
    for token in range(p):
        maps = attention_rollout(attn, grid, num_prefix_tokens=p, token_index=token)
        torch.testing.assert_close(maps, torch.full((1, 4, 4), expected / T))


def test_layers_are_multiplied_first_layer_first():
    # layer 1: patch a reads patch b; layer 2: the class token reads patch a. b's content reaches the class
    # token's output only in this order (through a), with the weights of R = A2' A1', A' = (A + I) / 2.
    grid, T = (2, 2), 5
    a, b = 1 + 0, 1 + 3  # token indices of patches (0, 0) and (1, 1)
    a_reads_b = torch.eye(T)
    a_reads_b[a] = 0.0
    a_reads_b[a, b] = 1.0
    cls_reads_a = torch.eye(T)
    cls_reads_a[0] = 0.0
    cls_reads_a[0, a] = 1.0
    maps = attention_rollout([a_reads_b[None, None], cls_reads_a[None, None]], grid, 1)
    step = lambda m: (m.numpy() + np.eye(T)) / 2
    ref = (step(cls_reads_a) @ step(a_reads_b))[0, 1:].reshape(2, 2)
    np.testing.assert_allclose(maps[0].numpy(), ref, atol=1e-7)
    # class row of layer 2: 1/2 itself, 1/2 a; a after layer 1: 1/2 a, 1/2 b
    torch.testing.assert_close(maps[0], torch.tensor([[0.25, 0.0], [0.0, 0.25]]))
    # in the other order, b never reaches the class token
    rev = attention_rollout([cls_reads_a[None, None], a_reads_b[None, None]], grid, 1)
    torch.testing.assert_close(rev[0], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def test_heads_are_averaged_and_bf16_is_fine():
    T = 1 + 4
    h0 = torch.eye(T)
    h1 = torch.zeros(T, T)
    h1[:, 2] = 1.0  # all tokens read patch (0, 1)
    attn = torch.stack([h0, h1])[None]  # (1, 2, T, T)
    maps = attention_rollout([attn.bfloat16()], (2, 2), 1)
    # mean of heads: row 0 = [1/2, 0, 1/2, 0, 0]; + I -> [3/2, 0, 1/2, 0, 0] / 2
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.25], [0.0, 0.0]]]))


def test_no_prefix_tokens_reads_the_mean_over_patches():
    T = 4
    attn = torch.full((3, 1, T, T), 1.0 / T)
    maps = attention_rollout([attn], (2, 2), num_prefix_tokens=0)
    torch.testing.assert_close(maps, torch.full((3, 2, 2), 0.25))  # rows stay distributions over patches


def test_bad_arguments_are_clear_errors():
    T = 5
    attn = [torch.eye(T)[None, None]]
    with pytest.raises(ValueError, match="prefix token"):
        attention_rollout(attn, (2, 2), 1, token_index=1)
    with pytest.raises(ValueError, match="needs"):
        attention_rollout(attn, (3, 3), 1)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(attn, (2, 2), 1, head_fusion="median")
