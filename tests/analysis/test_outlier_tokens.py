"""High-norm outlier tokens (Darcet et al. 2024): planted outliers are found at their positions, and only there."""
import pytest
import torch

from vit_experiments.analysis.outlier_tokens import outlier_tokens, outliers_by_layer, patch_token_norms


def _tokens(b=3, p=1, grid=(4, 5), d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p + grid[0] * grid[1], d, generator=g)  # norms close to sqrt(d)
    return x


def test_planted_high_norm_tokens_are_found_at_their_positions():
    grid, p = (4, 5), 1
    x = _tokens(grid=grid, p=p)
    planted = [(0, 1, 3), (2, 3, 0)]  # (image, row, col)
    for b, r, c in planted:
        x[b, p + r * grid[1] + c] *= 8.0  # a register-like token, 8x the typical norm
    x[:, 0] *= 100.0  # a huge class token is not a patch: never flagged, never counted
    out = outlier_tokens(x, grid, p)
    expected = torch.zeros(3, 4, 5, dtype=torch.bool)
    for b, r, c in planted:
        expected[b, r, c] = True
    assert torch.equal(out.mask, expected)
    assert out.share.item() == pytest.approx(2 / (3 * 20))
    assert out.norm_ratio.item() > 6.0


def test_gaussian_tokens_have_no_outliers_and_layers_stack():
    grid = (4, 4)
    hidden = [_tokens(b=8, grid=grid, seed=s) for s in range(3)]
    out = outliers_by_layer(hidden, grid, 1)
    assert out.mask.shape == (3, 8, 4, 4) and out.share.shape == (3,)
    assert torch.all(out.share == 0)
    norms = patch_token_norms(hidden[0], grid, 1)
    torch.testing.assert_close(norms[2, 1, 3], hidden[0][2, 1 + 1 * 4 + 3].norm())  # row-major layout


def test_equal_norms_flag_nothing_and_bad_shapes_are_refused():
    x = torch.ones(2, 1 + 4, 3)
    assert not outlier_tokens(x, (2, 2), 1).mask.any()
    with pytest.raises(ValueError, match="prefix"):
        outlier_tokens(x, (3, 3), 1)
