"""Position-embedding similarity and the topology score on embeddings whose structure is known."""
import pytest
import torch

from vit_experiments.analysis import position_similarity, topology_score
from vit_experiments.analysis.position_similarity import grid_distances


def sincos_2d(dim, grid, temperature=10000.0):
    """A 2-D sine-cosine embedding (half the channels encode the row, half the column) -> (gh*gw, dim)."""
    q = dim // 4
    omega = temperature ** (-torch.arange(q, dtype=torch.float64) / q)  # (q,)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    y = rows.reshape(-1, 1).double() * omega  # (N, q)
    x = cols.reshape(-1, 1).double() * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], 1).float()  # (N, dim)


@pytest.mark.parametrize("grid", [(7, 7), (5, 8)])
def test_sincos_embedding_tiles_peak_at_their_own_position(grid):
    gh, gw = grid
    pe = torch.cat([torch.randn(1, 256), sincos_2d(256, grid)])[None]  # (1, 1 + N, 256) with a class token
    sim = position_similarity(pe, grid, num_prefix_tokens=1)
    assert sim.shape == (gh, gw, gh, gw) and sim.dtype == torch.float32
    for i in range(gh):
        for j in range(gw):
            tile = sim[i, j]
            assert divmod(int(tile.argmax()), gw) == (i, j)
            assert tile[i, j] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(sim, sim.permute(2, 3, 0, 1))  # cosine similarity is symmetric
    assert topology_score(sim) > 0.9


def test_random_embedding_scores_near_zero():
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 1024, generator=g)
    assert abs(topology_score(position_similarity(pe, (14, 14), 1))) < 0.1


def test_score_is_exactly_plus_or_minus_one_for_linear_similarity():
    grid = (4, 6)
    d = grid_distances(grid).reshape(4, 6, 4, 6)
    assert topology_score(1.0 - 0.1 * d) == pytest.approx(1.0, abs=1e-12)
    assert topology_score(d) == pytest.approx(-1.0, abs=1e-12)


def test_prefix_entries_are_ignored_and_2d_input_accepted():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(12, 32, generator=g)
    a = position_similarity(torch.cat([torch.zeros(2, 32), patches])[None], (3, 4), num_prefix_tokens=2)
    b = position_similarity(torch.cat([torch.randn(2, 32, generator=g), patches]), (3, 4), num_prefix_tokens=2)
    c = position_similarity(patches, (3, 4), num_prefix_tokens=0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # brute-force cosine of one pair
    expected = torch.nn.functional.cosine_similarity(patches[1 * 4 + 2], patches[2 * 4 + 0], dim=0)
    torch.testing.assert_close(a[1, 2, 2, 0], expected)


def test_bfloat16_embedding():
    pe = sincos_2d(64, (4, 4))
    sim = position_similarity(pe.bfloat16(), (4, 4), 0)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, position_similarity(pe, (4, 4), 0), atol=2e-2, rtol=0)


def test_wrong_length_is_a_clear_error():
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        position_similarity(torch.randn(1, 17, 8), (4, 4), num_prefix_tokens=2)
    with pytest.raises(ValueError, match=r"\(1, T, D\)"):
        position_similarity(torch.randn(2, 17, 8), (4, 4), 1)
    with pytest.raises(ValueError, match="gh, gw, gh, gw"):
        topology_score(torch.randn(16, 16))
