"""Linear centred kernel alignment (CKA) between layer representations, with the minibatch estimator.

Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited" (ICML): for representations
X (n x p1) and Y (n x p2) of the same n examples, with linear kernels K = X X^T and L = Y Y^T,
CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). It is 1 for X against itself and invariant to orthogonal
transforms and isotropic scaling of either side (K only changes by a positive factor), but not to arbitrary
invertible linear maps.

Nguyen et al. 2021, "Do Wide and Deep Networks Learn the Same Things?" (ICLR): with the unbiased HSIC estimator
of Song et al. 2012 ("Feature Selection via Dependence Maximization", JMLR), HSIC averages over minibatches, so
CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b)) needs only one n_b x n_b
Gram matrix per layer and minibatch at a time, never all examples at once. For a minibatch of n >= 4, with K~ and
L~ the Gram matrices with their diagonals set to 0:

    HSIC_1(K, L) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3)).

Its value is an unbiased estimate, so a minibatch CKA can fall slightly outside [0, 1] on few examples.
This module works on feature matrices and Gram matrices; which features stand for a layer (here: each image's
tokens, flattened) is the caller's choice, documented in analysis/report.py.
"""
from typing import Optional, Sequence

import torch


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix of n examples: (n, ...) features, flattened per example -> (n, n) float64."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("features must be a tensor of shape (examples, ...)")
    f = x.reshape(x.shape[0], -1).double()  # (n, p)
    return f @ f.T  # (n, n)


def _unbiased_terms(grams: torch.Tensor):
    """Per kernel: the off-diagonal Gram (flattened), its sum and its row sums, for HSIC_1 between every pair."""
    n = grams.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs at least 4 examples per minibatch, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=grams.device)
    g = grams.masked_fill(eye, 0.0)  # (k, n, n) diagonals zeroed
    return g.reshape(g.shape[0], -1), g.sum(dim=(-2, -1)), g.sum(-1)  # (k, n*n), (k,), (k, n)


def hsic_unbiased_matrix(grams_a: torch.Tensor, grams_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HSIC_1 between every kernel of grams_a (ka, n, n) and every kernel of grams_b (kb, n, n) -> (ka, kb).

    grams_b defaults to grams_a. The Gram matrices must be symmetric (linear kernels are).
    """
    grams_b = grams_a if grams_b is None else grams_b
    if grams_a.ndim != 3 or grams_b.ndim != 3 or grams_a.shape[-1] != grams_b.shape[-1]:
        raise ValueError(f"Gram matrices must be (kernels, n, n) over the same n examples; got "
                         f"{tuple(grams_a.shape)} and {tuple(grams_b.shape)}")
    n = grams_a.shape[-1]
    fa, sa, ra = _unbiased_terms(grams_a.double())
    fb, sb, rb = _unbiased_terms(grams_b.double())
    trace = fa @ fb.T  # (ka, kb) tr(K~ L~) = sum_ij K~_ij L~_ij for symmetric kernels
    sums = sa[:, None] * sb[None, :] / ((n - 1) * (n - 2))  # (ka, kb)
    cross = ra @ rb.T  # (ka, kb) 1'K~L~1 = (K~1).(L~1)
    return (trace + sums - 2.0 / (n - 2) * cross) / (n * (n - 3))


class MinibatchCKA:
    """Accumulates HSIC_1 over minibatches for all pairs of layers of one model, and optionally against a second
    model on the same examples; cka() and cross_cka() give the (L, L) and (L, L') CKA matrices.

    update(grams, grams_other=None): grams (L, n, n) for this minibatch, one per layer (gram_linear of each
    layer's features); grams_other (L', n, n) the compared model's on the same n examples.
    """

    def __init__(self) -> None:
        self.self_hsic: Optional[torch.Tensor] = None  # (L, L)
        self.other_hsic: Optional[torch.Tensor] = None  # (L', L')
        self.cross_hsic: Optional[torch.Tensor] = None  # (L, L')
        self.batches = 0

    @staticmethod
    def _add(acc: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return x if acc is None else acc + x

    def update(self, grams: torch.Tensor, grams_other: Optional[torch.Tensor] = None) -> None:
        self.self_hsic = self._add(self.self_hsic, hsic_unbiased_matrix(grams))
        if grams_other is not None:
            self.other_hsic = self._add(self.other_hsic, hsic_unbiased_matrix(grams_other))
            self.cross_hsic = self._add(self.cross_hsic, hsic_unbiased_matrix(grams, grams_other))
        self.batches += 1

    @staticmethod
    def _normalise(cross: torch.Tensor, diag_a: torch.Tensor, diag_b: torch.Tensor) -> torch.Tensor:
        denom = torch.sqrt((diag_a[:, None] * diag_b[None, :]).clamp_min(0.0))
        return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.full_like(cross, float("nan")))

    def cka(self) -> torch.Tensor:
        """(L, L) CKA between the layers of the model (float32)."""
        if self.self_hsic is None:
            raise ValueError("no minibatch given yet; call update() first")
        d = torch.diagonal(self.self_hsic)
        return self._normalise(self.self_hsic, d, d).float()

    def cross_cka(self) -> Optional[torch.Tensor]:
        """(L, L') CKA between the layers of the model and those of the compared one, or None without one."""
        if self.cross_hsic is None:
            return None
        return self._normalise(self.cross_hsic, torch.diagonal(self.self_hsic), torch.diagonal(self.other_hsic)).float()


def linear_cka(x: torch.Tensor, y: torch.Tensor, batch_size: Optional[int] = None) -> torch.Tensor:
    """Minibatch linear CKA of two representations of the same n examples, (n, ...) each -> () float32.

    batch_size: examples per minibatch (default: all n in one). A last minibatch of fewer than 4 is dropped.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must describe the same examples; got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    b = n if batch_size is None else int(batch_size)
    acc = MinibatchCKA()
    for start in range(0, n, b):
        xs, ys = x[start:start + b], y[start:start + b]
        if xs.shape[0] < 4 and acc.batches:
            break
        acc.update(gram_linear(xs)[None], gram_linear(ys)[None])
    return acc.cross_cka()[0, 0]


def cka_matrix(features: Sequence[torch.Tensor], batch_size: Optional[int] = None) -> torch.Tensor:
    """CKA between every pair of layers: features per layer, each (n, ...) over the same n examples -> (L, L)."""
    if len(features) == 0:
        raise ValueError("no layer features given")
    n = features[0].shape[0]
    b = n if batch_size is None else int(batch_size)
    acc = MinibatchCKA()
    for start in range(0, n, b):
        if n - start < 4 and acc.batches:
            break
        acc.update(torch.stack([gram_linear(f[start:start + b]) for f in features]))
    return acc.cka()
