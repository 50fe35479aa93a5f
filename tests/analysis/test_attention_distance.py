"""Mean attention distance on attention maps whose answer is known in closed form or by brute force."""
import itertools
import math

import pytest
import torch

from vit_experiments.analysis import attention_distance_by_layer, mean_attention_distance


def centre_distance(a, b, patch):
    """Pixel distance between the centres of patches a=(row, col) and b, with patch=(ph, pw)."""
    (ra, ca), (rb, cb) = a, b
    return math.hypot((ra - rb) * patch[0], (ca - cb) * patch[1])


def cells(grid):
    return list(itertools.product(range(grid[0]), range(grid[1])))  # row-major, as the patch tokens


def with_prefix(patch_attn, prefix_mass):
    """Patch-query rows over patch keys (B, H, N, N) -> full (B, H, T, T) with prefix_mass on the prefix keys.

    Prefix-query rows are uniform; they must not matter.
    """
    B, H, N, _ = patch_attn.shape
    p = prefix_mass.shape[-1]
    T = p + N
    attn = torch.full((B, H, T, T), 1.0 / T)
    attn[:, :, p:, :p] = prefix_mass
    attn[:, :, p:, p:] = patch_attn * (1 - prefix_mass.sum(-1, keepdim=True))
    return attn


@pytest.mark.parametrize("grid,patch,p", [((4, 4), 16, 1), ((3, 5), 8, 2), ((2, 3), (4, 6), 0)])
def test_identity_attention_has_zero_distance(grid, patch, p):
    T = p + grid[0] * grid[1]
    attn = torch.eye(T).expand(2, 3, T, T)
    out = mean_attention_distance(attn, grid, patch, p)
    assert out.distance.shape == (3,) and out.prefix_share.shape == (3,)
    assert torch.equal(out.distance, torch.zeros(3))
    assert torch.equal(out.prefix_share, torch.zeros(3))


@pytest.mark.parametrize("grid,patch,p", [((4, 4), 16, 1), ((3, 5), 8, 2), ((2, 3), (4, 6), 0), ((7, 7), 32, 1)])
def test_uniform_attention_gives_mean_pairwise_centre_distance(grid, patch, p):
    pair = patch if isinstance(patch, tuple) else (patch, patch)
    cs = cells(grid)
    # brute force: every query attends equally to every patch, itself included
    expected = sum(centre_distance(a, b, pair) for a in cs for b in cs) / len(cs) ** 2
    T = p + len(cs)
    attn = torch.full((2, 4, T, T), 1.0 / T)  # uniform over all tokens, prefix ones included
    out = mean_attention_distance(attn, grid, patch, p)
    torch.testing.assert_close(out.distance, torch.full((4,), expected), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out.prefix_share, torch.full((4,), p / T))


def test_attention_to_one_fixed_patch():
    grid, P, p = (5, 6), 16, 1
    cs = cells(grid)
    target = cs.index((1, 4))
    expected = sum(centre_distance(q, (1, 4), (P, P)) for q in cs) / len(cs)
    patch_attn = torch.zeros(1, 2, len(cs), len(cs))
    patch_attn[..., target] = 1.0
    attn = with_prefix(patch_attn, torch.full((1, 2, len(cs), p), 0.25))
    out = mean_attention_distance(attn, grid, P, p)
    torch.testing.assert_close(out.distance, torch.full((2,), expected))
    torch.testing.assert_close(out.prefix_share, torch.full((2,), 0.25))


def test_prefix_tokens_are_excluded_and_rows_renormalised():
    grid, P, p = (4, 4), 16, 2
    N = 16
    g = torch.Generator().manual_seed(0)
    patch_attn = torch.softmax(torch.randn(3, 2, N, N, generator=g), -1)
    base = mean_attention_distance(with_prefix(patch_attn, torch.zeros(3, 2, N, p)), grid, P, p)
    # move a different, random share of every query's attention onto the prefix tokens
    share = torch.rand(3, 2, N, 1, generator=g) * 0.9  # (B, H, N, 1)
    split = torch.rand(3, 2, N, p, generator=g)
    prefix_mass = share * split / split.sum(-1, keepdim=True)  # (B, H, N, p), rows sum to `share`
    out = mean_attention_distance(with_prefix(patch_attn, prefix_mass), grid, P, p)
    torch.testing.assert_close(out.distance, base.distance)
    torch.testing.assert_close(out.prefix_share, share.mean((0, 2, 3)))
    # and the prefix-query rows play no part at all
    attn = with_prefix(patch_attn, prefix_mass)
    attn[:, :, :p] = torch.softmax(torch.randn(3, 2, p, p + N, generator=g), -1)
    torch.testing.assert_close(mean_attention_distance(attn, grid, P, p).distance, base.distance)


def test_heads_and_batch_are_averaged_separately():
    grid, P, p = (3, 3), 10, 1
    N, T = 9, 10
    cs = cells(grid)
    ident = torch.eye(T)
    uniform = torch.full((T, T), 1.0 / T)
    corner = torch.zeros(T, T)
    corner[:, p] = 1.0  # every query attends to patch (0, 0)
    # head 0: identity for both images; head 1: uniform for image 0 and corner for image 1
    attn = torch.stack([torch.stack([ident, uniform]), torch.stack([ident, corner])])  # (B=2, H=2, T, T)
    uni = sum(centre_distance(a, b, (P, P)) for a in cs for b in cs) / N**2
    cor = sum(centre_distance(a, (0, 0), (P, P)) for a in cs) / N
    out = mean_attention_distance(attn, grid, P, p)
    torch.testing.assert_close(out.distance, torch.tensor([0.0, (uni + cor) / 2]))
    torch.testing.assert_close(out.prefix_share, torch.tensor([0.0, (1 / T + 0.0) / 2]))


def test_query_without_patch_attention_is_left_out():
    grid, P, p = (2, 2), 8, 1
    T = 5
    attn = torch.zeros(1, 1, T, T)
    attn[0, 0, :, 0] = 1.0  # every row all on the class token ...
    attn[0, 0, 1, 4] = 1.0  # ... except query patch (0, 0), which looks at patch (1, 1)
    attn[0, 0, 1, 0] = 0.0
    out = mean_attention_distance(attn, grid, P, p)
    torch.testing.assert_close(out.distance, torch.tensor([math.hypot(8, 8)]))  # mean over that one query
    torch.testing.assert_close(out.prefix_share, torch.tensor([0.75]))
    attn[0, 0, 1] = 0.0
    attn[0, 0, 1, 0] = 1.0
    assert torch.isnan(mean_attention_distance(attn, grid, P, p).distance).all()


def test_bfloat16_input_is_computed_in_float32():
    grid, P, p = (6, 6), 16, 1
    T = 37
    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(torch.randn(2, 3, T, T, generator=g) * 3, -1)
    ref = mean_attention_distance(attn, grid, P, p)
    out = mean_attention_distance(attn.bfloat16(), grid, P, p)
    assert out.distance.dtype == torch.float32 and out.prefix_share.dtype == torch.float32
    torch.testing.assert_close(out.distance, ref.distance, rtol=1e-2, atol=0.0)  # bf16 rounding of the probs
    torch.testing.assert_close(out.prefix_share, ref.prefix_share, rtol=2e-2, atol=1e-3)


def test_by_layer_stacks_to_layers_by_heads():
    grid, P, p = (4, 4), 16, 1
    T = 17
    attns = [torch.eye(T).expand(2, 3, T, T), torch.full((2, 3, T, T), 1.0 / T)]
    out = attention_distance_by_layer(attns, grid, P, p)
    assert out.distance.shape == (2, 3) and out.prefix_share.shape == (2, 3)
    assert torch.equal(out.distance[0], torch.zeros(3))
    torch.testing.assert_close(out.distance[1], mean_attention_distance(attns[1], grid, P, p).distance)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="prefix"):
        mean_attention_distance(torch.eye(17).expand(1, 1, 17, 17), (4, 4), 16, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="batch, heads, T, T"):
        mean_attention_distance(torch.eye(17), (4, 4), 16, 1)
    with pytest.raises(ValueError, match="return_attention"):
        attention_distance_by_layer([], (4, 4), 16, 1)
