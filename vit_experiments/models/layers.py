"""Transformer building blocks shared by every model in vitx.

ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), DeiT (Touvron et al. 2021) and CLIP's two
towers (Radford et al. 2021) all use the same pre-norm block: LayerNorm -> multi-head self-attention ->
residual; LayerNorm -> MLP -> residual. Stochastic depth is from Huang et al. 2016 ("Deep Networks with
Stochastic Depth"). There is exactly one attention implementation here so that all three families share it.
"""

from functools import partial
from typing import Callable, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP models were trained with (Radford et al. 2021).
    Their weights give other outputs under the exact GELU, so an imported OpenAI model must keep this one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# the MLP activations a config can name: "gelu" (ViT, DeiT, open_clip), "gelu_tanh" (the tanh approximation some
# ports use), "quick_gelu" (OpenAI's CLIP)
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
}


def activation(name: str) -> Callable[[], nn.Module]:
    """The activation class registered under `name`, with an error that lists the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def merge_masks(
    attn_mask: Optional[torch.Tensor], is_causal: bool, T: int, dtype: torch.dtype, device: torch.device
) -> Optional[torch.Tensor]:
    """Turn (attn_mask, is_causal) into one additive float mask broadcastable to (B, heads, T, T), or None.

    Follows F.scaled_dot_product_attention's conventions: a boolean mask is True where a query may attend to a
    key, a float mask is added to the scores. The explicit path needs one mask; SDPA refuses both at once.
    """
    if attn_mask is None and not is_causal:
        return None
    bias = torch.zeros(T, T, dtype=dtype, device=device)  # (T, T)
    if is_causal:
        future = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)  # (T, T) True above the diagonal
        bias = bias.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.where(attn_mask, bias, float("-inf"))  # broadcasts to attn_mask's shape
        else:
            bias = bias + attn_mask.to(dtype)
    return bias


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Two paths with equal outputs: the default calls F.scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU); `return_attention=True` computes softmax(q k^T / sqrt(d)) explicitly and also returns the
    probabilities, which the analyses (attention distance, rollout) need, and with `return_logit_max=True` the
    largest pre-softmax logit per sample and head, which the probabilities cannot give back (its growth warns of
    divergence: Zhai et al. 2023).
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}; pick a divisor of the width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop_p = attn_drop  # SDPA takes the rate, not a module
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        return_attention: bool = False,
        return_logit_max: bool = False,
    ):
        """x: (B, T, D). attn_mask: bool (True = may attend) or additive float, broadcastable to (B, heads, T, T).

        Returns (B, T, D), or ((B, T, D), (B, heads, T, T) probabilities before dropout) with return_attention;
        return_logit_max (with return_attention) adds a third element, (B, heads): the largest logit the softmax
        saw (scaled q.k plus the mask) over queries and keys.
        """
        if return_logit_max and not return_attention:
            raise ValueError("return_logit_max needs return_attention=True (the fused path never forms the logits)")
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        if return_attention:
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
            bias = merge_masks(attn_mask, is_causal, T, scores.dtype, scores.device)
            if bias is not None:
                scores = scores + bias
            probs = scores.softmax(dim=-1)  # (B, heads, T, T)
            out = self.attn_drop(probs) @ v  # (B, heads, T, head_dim)
        else:
            if attn_mask is not None and is_causal:  # SDPA takes one or the other
                attn_mask, is_causal = merge_masks(attn_mask, True, T, q.dtype, q.device), False
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop_p if self.training else 0.0,
            )  # (B, heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D) heads concatenated
        out = self.proj_drop(self.proj(out))
        if return_logit_max:
            return out, probs, scores.detach().amax(dim=(-2, -1))  # (B, heads)
        return (out, probs) if return_attention else out


class Mlp(nn.Module):
    """The transformer's feed-forward network: Linear -> GELU -> Linear, hidden width mlp_dim (4*D in ViT)."""

    def __init__(self, dim: int, mlp_dim: int, drop: float = 0.0, act_layer: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, T, mlp_dim)
        return self.drop2(self.fc2(x))  # (B, T, D)


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the whole residual branch for a random subset of samples.

    Kept samples are scaled by 1/(1-p) so the expected output is unchanged and eval needs no rescaling.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # (B, 1, 1): one coin per sample
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop, act_layer=act_layer)
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        return_attention: bool = False,
        return_logit_max: bool = False,
    ):
        """x: (B, T, D) -> (B, T, D), or ((B, T, D), (B, heads, T, T)) with return_attention, plus the attention's
        (B, heads) logit maxima with return_logit_max."""
        a = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, return_attention=return_attention,
                      return_logit_max=return_logit_max)
        a, *extra = a if return_attention else (a,)  # extra: [probs] or [probs, logit_max]
        x = x + self.drop_path1(a)  # (B, T, D)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # (B, T, D)
        return (x, *extra) if return_attention else x


def block_param_layer(name: str, embedding_prefixes: tuple[str, ...], depth: int) -> int:
    """Depth of a parameter of a stack of `blocks` for layer-wise learning-rate decay: 0 for the embeddings (names
    starting with one of `embedding_prefixes`), i + 1 for blocks.i, depth + 1 for what sits on top."""
    if name.startswith(embedding_prefixes):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


class PatchEmbed(nn.Module):
    """Split an image into P x P patches and project each to D dims: a stride-P convolution, which equals a
    Linear on the flattened (C * P * P) patch."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, gh*gw, D) patches in row-major order
