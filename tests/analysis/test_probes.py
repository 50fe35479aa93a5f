"""Closed-form ridge probes: separable features score 1, label-free features score near chance, splits are disjoint."""
import pytest
import torch

from vit_experiments.analysis.probes import probe_layers, ridge_probe_accuracy, train_test_split


def _separable(n=120, classes=4, p=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = 5.0 * torch.randn(classes, p, generator=g)
    return centres[y] + 0.3 * torch.randn(n, p, generator=g), y


def test_split_is_disjoint_and_covers_everything():
    s = train_test_split(101, 0.4, seed=3)
    assert len(s.test) == 40 and len(s.train) == 61
    assert set(s.train.tolist()).isdisjoint(s.test.tolist())
    assert sorted(s.train.tolist() + s.test.tolist()) == list(range(101))
    with pytest.raises(ValueError, match="too few"):
        train_test_split(2, 0.5)


@pytest.mark.parametrize("p", [16, 500])  # primal and dual solves
def test_linearly_separable_features_score_one(p):
    x, y = _separable(p=p)
    s = train_test_split(len(y))
    assert ridge_probe_accuracy(x[s.train], y[s.train], x[s.test], y[s.test], 4) == 1.0


def test_noise_scores_near_chance_and_layers_are_probed_separately():
    x, y = _separable()
    noise = torch.randn(120, 16, generator=torch.Generator().manual_seed(7))
    s = train_test_split(120)
    acc = probe_layers([noise, x], y, s, num_classes=4)
    assert acc.shape == (2,) and acc[1] == 1.0
    assert acc[0] < 0.5  # chance is 0.25
