"""Attention entropy, the largest attention logit, and the normalised mutual information of attention.

Entropy and logits: Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
Collapse". A head whose attention entropy falls towards 0 (every query on one key) and pre-softmax logits that
keep growing come before a training run diverges; ViT-22B (Dehghani et al. 2023) normalises queries and keys for
this reason. Conventions here, for attention probabilities A of shape (B, heads, T, T) whose first p tokens are
special (class / distillation / register):
  entropy     per query, -sum_k a_qk log a_qk over ALL T keys (the distribution the softmax made), averaged over
              the patch queries (the p prefix queries left out) and the batch; in nats. Uniform attention over
              T keys gives log T, one-hot attention 0.
  logit max   the largest q.k / sqrt(d) the softmax saw in the layer (mask included), over the batch, heads,
              queries and keys; the model returns it (Attention(return_logit_max=True)), because the
              probabilities alone do not determine it.

NMI: Park et al. 2023, "What do self-supervised vision transformers learn?" (ICLR). Take the query position Q
uniform over the N patch tokens and the key position K drawn from the query's attention, restricted to patch keys
and renormalised: p(q, k) = a_qk / N. Then I(Q; K) = H(K) - H(K | Q), with H(K) the entropy of the mean
attention row and H(K | Q) the mean row entropy, and NMI = I(Q; K) / sqrt(H(Q) H(K)), H(Q) = log N. Computed
per image and head, then averaged over images. 0 when every query attends the same way (e.g. uniformly: the
key says nothing about the query), 1 when each query attends a key of its own (e.g. itself).
"""
from typing import Sequence

import torch


def _check(attn: torch.Tensor, num_prefix_tokens: int) -> None:
    if not isinstance(attn, torch.Tensor) or attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        shape = tuple(attn.shape) if isinstance(attn, torch.Tensor) else type(attn).__name__
        raise ValueError(f"attention must be a tensor of shape (batch, heads, T, T); got {shape}")
    if not 0 <= num_prefix_tokens < attn.shape[-1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} leaves no patch query among {attn.shape[-1]} tokens")


def _row_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dim, with 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def attention_entropy(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean entropy (nats) of the patch queries' attention over all keys -> (heads,) float32.

    attn: (B, heads, T, T) probabilities, rows summing to 1.
    """
    _check(attn, num_prefix_tokens)
    rows = attn[:, :, num_prefix_tokens:].float()  # (B, heads, N, T) patch queries, all keys
    return _row_entropy(rows).mean(dim=(0, 2))  # (heads,)


def attention_nmi(attn: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Normalised mutual information between patch-query position and attended patch-key position -> (heads,).

    attn: (B, heads, T, T). Keys are restricted to the patches and each row renormalised (see the module
    docstring). A head with H(K) = 0 (every query on the same single key) has I = 0 and NMI 0.
    """
    _check(attn, num_prefix_tokens)
    p = num_prefix_tokens
    rows = attn[:, :, p:, p:].double()  # (B, heads, N, N) patch queries -> patch keys
    n = rows.shape[-1]
    rows = rows / rows.sum(-1, keepdim=True).clamp_min(1e-30)  # each query's distribution over patch keys
    h_k = _row_entropy(rows.mean(dim=2))  # (B, heads) entropy of the key marginal, queries uniform
    h_k_given_q = _row_entropy(rows).mean(dim=2)  # (B, heads)
    mi = (h_k - h_k_given_q).clamp_min(0.0)  # (B, heads); >= 0 up to rounding
    h_q = torch.log(torch.tensor(float(n), dtype=torch.float64))
    denom = torch.sqrt(h_q * h_k)
    nmi = torch.where(denom > 1e-12, mi / denom.clamp_min(1e-12), torch.zeros_like(mi))  # (B, heads)
    return nmi.mean(0).float()  # (heads,)


def entropy_by_layer(attns: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """attention_entropy for every layer -> (layers, heads)."""
    if len(attns) == 0:
        raise ValueError("no attention maps given; call forward_features(x, return_attention=True)")
    return torch.stack([attention_entropy(a, num_prefix_tokens) for a in attns])


def nmi_by_layer(attns: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """attention_nmi for every layer -> (layers, heads)."""
    if len(attns) == 0:
        raise ValueError("no attention maps given; call forward_features(x, return_attention=True)")
    return torch.stack([attention_nmi(a, num_prefix_tokens) for a in attns])


def logit_max_by_layer(logit_maxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer, the largest pre-softmax logit over the batch and heads -> (layers,) float32.

    logit_maxes: per layer the (B, heads) maxima the attention module returns with return_logit_max=True.
    """
    if len(logit_maxes) == 0:
        raise ValueError("no logit maxima given; call forward_features(x, return_attention=True, "
                         "return_logit_max=True)")
    return torch.stack([m.detach().float().amax() for m in logit_maxes])  # (layers,)
