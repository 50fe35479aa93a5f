"""Position-embedding resampling and the fixed 2-D sin-cos embedding."""

import math

import pytest
import torch

from vit_experiments.models.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed


def test_same_grid_returns_the_input_exactly():
    pe = torch.randn(1, 1 + 16, 8)
    out = resample_abs_pos_embed(pe, (4, 4), (4, 4), num_prefix_tokens=1)
    assert out is pe
    assert torch.equal(resample_abs_pos_embed(pe, 4, None, num_prefix_tokens=1), pe)


def test_resample_keeps_prefix_and_constants():
    torch.manual_seed(0)
    D = 6
    prefix = torch.randn(1, 2, D)
    const = torch.randn(1, 1, D).expand(1, 9, D)  # the same vector at every patch
    pe = torch.cat([prefix, const], dim=1)
    out = resample_abs_pos_embed(pe, (5, 5), (3, 3), num_prefix_tokens=2)
    assert out.shape == (1, 2 + 25, D)
    assert torch.equal(out[:, :2], prefix)
    # bicubic weights sum to one, so a constant field stays constant
    torch.testing.assert_close(out[:, 2:], const[:, :1].expand(1, 25, D), atol=1e-5, rtol=1e-5)


def test_resample_respects_row_major_layout_of_non_square_grids():
    gh, gw, D = 2, 4, 3
    cols = torch.arange(gw, dtype=torch.float32).repeat(gh)  # value = column index, row-major
    pe = torch.cat([torch.zeros(1, 1, D), cols.reshape(1, gh * gw, 1).expand(1, gh * gw, D)], dim=1)
    out = resample_abs_pos_embed(pe, (4, 8), (gh, gw), num_prefix_tokens=1)[0, 1:, 0].reshape(4, 8)
    # varies along columns only, increasing left to right
    torch.testing.assert_close(out, out[:1].expand(4, 8))
    assert torch.all(out[0, 1:] >= out[0, :-1])


def test_resample_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="old_grid"):
        resample_abs_pos_embed(torch.randn(1, 1 + 10, 4), (4, 4), None, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="3x3 grid"):
        resample_abs_pos_embed(torch.randn(1, 1 + 16, 4), (4, 4), (3, 3), num_prefix_tokens=1)


def test_sincos_values():
    D, gh, gw = 8, 3, 5
    pe = sincos_2d_pos_embed(D, (gh, gw), num_prefix_tokens=1)
    assert pe.shape == (1, 1 + gh * gw, D)
    assert torch.all(pe[0, 0] == 0)
    i, j = 2, 3  # row 2, column 3
    w = [1.0, 1.0 / 10000 ** 0.5]  # temperature^(-k/(D/4)), k = 0, 1
    expected = [f(j * x) for f in (math.sin, math.cos) for x in w] + [f(i * x) for f in (math.sin, math.cos) for x in w]
    torch.testing.assert_close(pe[0, 1 + i * gw + j], torch.tensor(expected))
    assert len({tuple(v.tolist()) for v in pe[0, 1:]}) == gh * gw  # every patch has its own code


def test_sincos_needs_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed(6, 4)
