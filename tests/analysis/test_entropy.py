"""Attention entropy, NMI (Park et al. 2023) and the logit maximum on attention maps with closed-form answers."""
import math

import pytest
import torch

from vit_experiments.analysis.entropy import (
    attention_entropy, attention_nmi, entropy_by_layer, logit_max_by_layer, nmi_by_layer,
)


def test_uniform_attention_has_entropy_log_t_and_nmi_zero():
    p, n = 1, 16
    T = p + n
    attn = torch.full((2, 3, T, T), 1.0 / T)
    torch.testing.assert_close(attention_entropy(attn, p), torch.full((3,), math.log(T)))
    torch.testing.assert_close(attention_nmi(attn, p), torch.zeros(3), atol=1e-6, rtol=0)


def test_one_hot_attention_has_entropy_zero():
    T = 1 + 9
    attn = torch.zeros(2, 2, T, T)
    attn[..., 0] = 1.0  # every query on the class token
    torch.testing.assert_close(attention_entropy(attn, 1), torch.zeros(2))


def test_entropy_averages_patch_queries_only():
    p, n = 2, 4
    T = p + n
    attn = torch.full((1, 1, T, T), 1.0 / T)
    attn[0, 0, :p] = 0.0
    attn[0, 0, :p, 0] = 1.0  # prefix queries one-hot: left out, so the mean stays log T
    torch.testing.assert_close(attention_entropy(attn, p), torch.tensor([math.log(T)]))
    assert attention_entropy(attn, 0).item() == pytest.approx(math.log(T) * n / T)


def test_self_attention_has_nmi_one_and_a_shared_key_nmi_zero():
    p, n = 1, 9
    T = p + n
    eye = torch.zeros(1, 2, T, T)
    eye[..., torch.arange(T), torch.arange(T)] = 1.0  # each query on itself: the key gives the query away
    torch.testing.assert_close(attention_nmi(eye, p), torch.ones(2))
    same = torch.zeros(1, 1, T, T)
    same[..., 3] = 1.0  # every query on patch 2: I = 0, H(K) = 0
    torch.testing.assert_close(attention_nmi(same, p), torch.zeros(1))


def test_nmi_of_a_half_informative_head():
    # n = 4 patches in 2 pairs; each query spreads over its own pair: I = log 4 - log 2, NMI = log 2 / log 4 = 1/2
    n = 4
    attn = torch.zeros(1, 1, n, n)
    attn[0, 0, :2, :2] = 0.5
    attn[0, 0, 2:, 2:] = 0.5
    torch.testing.assert_close(attention_nmi(attn, 0), torch.tensor([0.5]))
    torch.testing.assert_close(attention_entropy(attn, 0), torch.tensor([math.log(2)]))


def test_by_layer_stacks_and_logit_max_takes_the_largest():
    attns = [torch.full((1, 2, 5, 5), 0.2)] * 3
    assert entropy_by_layer(attns, 1).shape == (3, 2) and nmi_by_layer(attns, 1).shape == (3, 2)
    maxes = [torch.tensor([[1.0, 7.0], [3.0, -2.0]]), torch.tensor([[-1.0, -4.0], [-0.5, -3.0]])]
    torch.testing.assert_close(logit_max_by_layer(maxes), torch.tensor([7.0, -0.5]))
    with pytest.raises(ValueError, match="return_attention"):
        entropy_by_layer([], 1)
    with pytest.raises(ValueError, match="shape"):
        attention_entropy(torch.zeros(2, 5, 5), 1)
