"""CLIP's text tower: a causal transformer over caption tokens, read out at the end-of-text token.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 2.4: a
GPT-2-style transformer (Radford et al. 2019) with a causal mask — 12 layers, width 512, 8 heads — over
lower-cased BPE tokens in a context of 76 + start token; "the activations of the highest layer of the transformer
at the [EOS] token are treated as the feature representation of the text", layer-normalised and linearly
projected into the multi-modal embedding space. The blocks are the project's one pre-norm Block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vit_experiments.models.layers import Block, activation, block_param_layer


@dataclass
class TextConfig:
    """The text transformer. Defaults are the paper's base text tower."""

    vocab_size: int = 49408
    """number of token ids the embedding holds; at least the tokenizer's vocabulary (CLIP's BPE has 49408)"""
    context_length: int = 77
    """longest token sequence (start + caption + end); sets the length of the position embedding"""
    width: int = 512
    """transformer width, depth and heads (paper: 512, 12, 8; its largest models widen only this tower's width)"""
    depth: int = 12
    num_heads: int = 8
    mlp_dim: Optional[int] = None
    """MLP hidden width; None = 4 * width as in GPT-2"""
    eot_token_id: int = 2
    """the token whose output is the caption's feature; data_pipelines.tokenizer puts it last, before padding"""
    eot_pooling: str = "first"
    """where the caption's feature is read: "first", the first position holding eot_token_id (vitx, Hugging Face
    with an eos_token_id); "argmax", the position of the highest id (OpenAI's and open_clip's rule, exact for a
    vocabulary whose end token has the highest id, as CLIP's BPE: 49407)"""
    norm_eps: float = 1e-5
    """CLIP's LayerNorm epsilon (PyTorch's default)"""
    drop_rate: float = 0.0
    """dropout in the blocks; CLIP trains without"""
    act: str = "gelu"
    """MLP activation: "gelu" (open_clip's default), "gelu_tanh", or "quick_gelu" (OpenAI's CLIP weights need it)"""

    def __post_init__(self):
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.width
        for f in ("vocab_size", "context_length", "width", "depth", "num_heads", "mlp_dim"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"text.{f} must be a positive integer, got {getattr(self, f)}")
        if self.width % self.num_heads != 0:
            raise ValueError(
                f"text.width {self.width} is not divisible by text.num_heads {self.num_heads}; pick a divisor"
            )
        if not 0 <= self.eot_token_id < self.vocab_size:
            raise ValueError(f"text.eot_token_id {self.eot_token_id} is outside the vocabulary [0, {self.vocab_size})")
        activation(self.act)  # raises for an unknown name
        if self.eot_pooling not in ("first", "argmax"):
            raise ValueError(f"text.eot_pooling must be 'first' or 'argmax', got {self.eot_pooling!r}")


class TextTransformer(nn.Module):
    """Token ids (B, T) -> caption embeddings (B, embed_dim), not normalised.

    Padding after the end token needs no mask: under the causal mask no earlier position sees it, and only the
    end token's output is read.
    """

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))  # (T, W)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, cfg.mlp_dim, drop=cfg.drop_rate, norm_eps=cfg.norm_eps,
                  act_layer=activation(cfg.act))
            for _ in range(cfg.depth)
        )
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        # no bias: the embedding space is compared by angle only (paper, Fig. 3 pseudocode)
        self.text_projection = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False  # set_grad_checkpointing
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        # the initialisation of the CLIP reference code: small embeddings; residual-branch outputs scaled down
        # with depth (GPT-2) so that the residual stream's variance stays near 1 at the top
        width, depth = self.cfg.width, self.cfg.depth
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * depth) ** -0.5, (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    def no_weight_decay(self) -> set:
        return {"positional_embedding", "token_embedding.weight"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block, as VisionTransformer.set_grad_checkpointing."""
        self.grad_checkpointing = enable

    def scaling_units(self) -> list[nn.Module]:
        """The transformer blocks: sharded, compiled and checkpointed one by one."""
        return list(self.blocks)

    def param_layer(self, name: str) -> int:
        """0 for the embeddings, i + 1 for blocks.i, num_layers() for the final norm and projection."""
        return block_param_layer(name, ("token_embedding", "positional_embedding"), self.cfg.depth)

    def num_layers(self) -> int:
        return self.cfg.depth + 1

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B,) index of the first end-of-text token in each row (eot_pooling "first"), or of the
        first highest id ("argmax")."""
        if self.cfg.eot_pooling == "argmax":
            return ids.argmax(dim=1)  # (B,) the first maximum, as OpenAI's text.argmax(dim=-1)
        is_eot = ids == self.cfg.eot_token_id  # (B, T)
        if not bool(is_eot.any(dim=1).all()):
            raise ValueError(
                f"a caption has no end-of-text token (id {self.cfg.eot_token_id}); encode captions with "
                "data_pipelines.tokenizer.CaptionTokenizer, or set text.eot_token_id to your tokenizer's end token"
            )
        return is_eot.int().argmax(dim=1)  # (B,) argmax returns the first maximum

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, W) token features after the final LayerNorm."""
        B, T = ids.shape
        if T > self.cfg.context_length:
            raise ValueError(
                f"token sequences of length {T} exceed text.context_length {self.cfg.context_length}; "
                "tokenize with the same context length as the model"
            )
        x = self.token_embedding(ids) + self.positional_embedding[:T]  # (B, T, W)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, is_causal=True, use_reentrant=False)  # (B, T, W)
            else:
                x = block(x, is_causal=True)  # (B, T, W)
        return self.ln_final(x)

    def forward(self, ids: torch.Tensor, eot_positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) ids -> (B, embed_dim): the end token's feature, projected. `eot_positions` (B,) overrides
        the search for the end token."""
        x = self.forward_features(ids)  # (B, T, W)
        if eot_positions is None:
            eot_positions = self.eot_positions(ids)
        x = x[torch.arange(x.shape[0], device=x.device), eot_positions]  # (B, W)
        return self.text_projection(x)  # (B, embed_dim)
