"""Minibatch linear CKA (Kornblith et al. 2019; Nguyen et al. 2021): its invariances and the unbiased HSIC."""
import pytest
import torch

from vit_experiments.analysis.cka import MinibatchCKA, cka_matrix, gram_linear, hsic_unbiased_matrix, linear_cka


def _x(n=40, p=12, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_with_itself_is_one_and_invariant_to_rotation_and_scale():
    x = _x()
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, 3.7 * x @ q).item() == pytest.approx(1.0, abs=1e-6)
    y = _x(seed=2)
    assert linear_cka(x, y @ q * 0.1).item() == pytest.approx(linear_cka(x, y).item(), abs=1e-6)
    assert linear_cka(x, x, batch_size=10).item() == pytest.approx(1.0, abs=1e-6)  # minibatches too


def test_cka_is_not_invariant_to_any_linear_map_and_independent_features_score_near_zero():
    x = _x(n=400, p=6)
    a = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 0.01], dtype=torch.float64))
    assert linear_cka(x, x @ a).item() < 0.9
    assert abs(linear_cka(x, _x(n=400, p=6, seed=5), batch_size=50).item()) < 0.05


def test_unbiased_hsic_matches_the_song_formula_written_out():
    n = 7
    x, y = _x(n=n, p=3), _x(n=n, p=4, seed=3)
    k, l = gram_linear(x), gram_linear(y)
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    ref = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
           - 2 / (n - 2) * (one.T @ k @ l @ one)) / (n * (n - 3))
    got = hsic_unbiased_matrix(gram_linear(x)[None], gram_linear(y)[None])
    torch.testing.assert_close(got, ref.reshape(1, 1))
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased_matrix(gram_linear(x[:3])[None])


def test_layer_matrix_and_cross_model_accumulator():
    x = _x(n=32, p=8)
    feats = [x, 2 * x, _x(n=32, p=8, seed=9)]
    m = cka_matrix(feats, batch_size=16)
    assert m.shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(3))
    torch.testing.assert_close(m, m.T)
    assert m[0, 1].item() == pytest.approx(1.0, abs=1e-6) and m[0, 2].item() < 0.5
    acc = MinibatchCKA()
    for s in (slice(0, 16), slice(16, 32)):
        acc.update(torch.stack([gram_linear(f[s]) for f in feats]), torch.stack([gram_linear(f[s]) for f in feats[:2]]))
    cross = acc.cross_cka()
    assert cross.shape == (3, 2)
    torch.testing.assert_close(cross, m[:, :2], atol=1e-6, rtol=0)
