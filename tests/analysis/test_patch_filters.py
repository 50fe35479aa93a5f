"""Principal components of the patch-embedding filters recover planted components."""
import pytest
import torch

from vit_experiments.analysis import patch_embed_components


def planted(D=96, C=3, P=4, k=5, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = C * P * P
    V, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))  # (dim, k) orthonormal
    Z = torch.randn(D, k, generator=g, dtype=torch.float64)
    Z = Z - Z.mean(0)
    U, _ = torch.linalg.qr(Z)  # (D, k) orthonormal, zero-mean columns
    scales = torch.tensor([8.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)[:k]
    mean_filter = torch.randn(dim, generator=g, dtype=torch.float64)  # PCA must remove it
    W = U * scales @ V.T + mean_filter + noise * torch.randn(D, dim, generator=g, dtype=torch.float64)
    return W.float().reshape(D, C, P, P), V.T.float(), scales**2 / (scales**2).sum()


def test_recovers_planted_components_and_variance_exactly():
    W, V, ratio = planted()
    out = patch_embed_components(W, k=5)
    assert out.components.shape == (5, 3, 4, 4) and out.explained_variance_ratio.shape == (5,)
    cos = (out.components.reshape(5, -1) * V).sum(1).abs()  # up to sign
    torch.testing.assert_close(cos, torch.ones(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.explained_variance_ratio, ratio.float(), atol=1e-5, rtol=0)


def test_recovers_planted_components_under_noise_and_signs_are_fixed():
    W, V, _ = planted(D=512, noise=0.05, seed=1)
    out = patch_embed_components(W, k=3)
    cos = (out.components.reshape(3, -1) * V[:3]).sum(1).abs()
    assert (cos > 0.99).all()
    flat = out.components.reshape(3, -1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()
    again = patch_embed_components(-W, k=3)  # flipping every filter must not flip the components
    torch.testing.assert_close(again.components, out.components, atol=1e-5, rtol=0)


def test_k_is_capped_and_none_returns_all():
    W = torch.randn(4, 1, 2, 2)  # rank <= 4 directions in 4 dims
    assert patch_embed_components(W, k=28).components.shape == (4, 1, 2, 2)
    out = patch_embed_components(W, k=None)
    assert out.explained_variance_ratio.sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="D, C, P, P"):
        patch_embed_components(torch.randn(4, 12))
