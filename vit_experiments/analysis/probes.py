"""Per-layer linear probes: how linearly decodable the labels are from each layer's features.

Alain & Bengio 2016 ("Understanding intermediate layers using linear classifier probes") fit a linear classifier
on each layer's frozen features; Raghu et al. 2021 ("Do Vision Transformers See Like Convolutional Neural
Networks?", Fig. 12) do so for ViT's class token and mean patch token at every layer. Here the probe is closed-form
ridge regression to one-hot labels, so a probe of every layer costs a few small linear solves and no training loop:

  1. standardise each feature with the mean and standard deviation of the training part (the scale of the
     residual stream grows with depth; the penalty should not depend on it);
  2. W = argmin ||X W - (Y - mean Y)||^2 + lam ||W||^2 with Y one-hot, lam = alpha * n_train (alpha = 0.1 by
     default: on standardised features, tr(X^T X) / p = n_train, so alpha is the penalty relative to the average
     eigenvalue), solved in the primal (p <= n) or dual (p > n) form, whichever system is smaller;
  3. predict the class with the largest score; accuracy on the held-out part, which shares no example with the
     training part.
"""
from typing import NamedTuple, Sequence

import torch


class Split(NamedTuple):
    train: torch.Tensor  # (n_train,) indices
    test: torch.Tensor  # (n_test,) indices


def train_test_split(n: int, test_fraction: float = 0.5, seed: int = 0) -> Split:
    """Disjoint random train / test indices of n examples (fixed by seed)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n - n_test < 2:
        raise ValueError(f"{n} examples are too few to split into a probe's training and test parts")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(perm[n_test:].sort().values, perm[:n_test].sort().values)


def ridge_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         num_classes: int, alpha: float = 0.1) -> float:
    """Fit the ridge probe on (train_x (n, p), train_y (n,) ints) and return its accuracy on the test part."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (n, p) with the same p; got {tuple(train_x.shape)}, {tuple(test_x.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, xt = train_x.double(), test_x.double()
    mu, sd = x.mean(0), x.std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # constant features stay 0 after centring
    x, xt = (x - mu) / sd, (xt - mu) / sd  # (n, p), (m, p)
    y = torch.nn.functional.one_hot(train_y.long(), num_classes).double()  # (n, classes)
    y_mean = y.mean(0)
    y = y - y_mean
    n, p = x.shape
    lam = alpha * n
    if p <= n:  # primal: (X^T X + lam I) W = X^T Y, a p x p system
        w = torch.linalg.solve(x.T @ x + lam * torch.eye(p, dtype=x.dtype), x.T @ y)  # (p, classes)
        scores = xt @ w
    else:  # dual: W = X^T (X X^T + lam I)^-1 Y, an n x n system
        a = torch.linalg.solve(x @ x.T + lam * torch.eye(n, dtype=x.dtype), y)  # (n, classes)
        scores = (xt @ x.T) @ a
    pred = (scores + y_mean).argmax(-1)  # (m,)
    return float((pred == test_y.long()).double().mean())


def probe_layers(features: Sequence[torch.Tensor], labels: torch.Tensor, split: Split, num_classes: int,
                 alpha: float = 0.1) -> torch.Tensor:
    """ridge_probe_accuracy for every layer: features per layer (n, p) over the same n labelled examples -> (L,)."""
    if labels.ndim != 1 or any(f.shape[0] != labels.shape[0] for f in features):
        raise ValueError("every layer's features need one row per label")
    ytr, yte = labels[split.train], labels[split.test]
    return torch.tensor([ridge_probe_accuracy(f[split.train], ytr, f[split.test], yte, num_classes, alpha)
                         for f in features])
