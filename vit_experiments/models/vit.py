"""Vision Transformer.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale"
(https://arxiv.org/abs/2010.11929); the distillation token and second head from Touvron et al. 2021,
"Training data-efficient image transformers & distillation through attention" (DeiT); register tokens from Darcet
et al. 2024, "Vision Transformers Need Registers". The same class is CLIP's image tower (pre_norm=True,
num_classes=0).

Prefix tokens come in the order [class, distillation, registers], then the patches; all of them count in
cfg.num_prefix_tokens, which the analyses skip. The position embedding always has an entry for every prefix token
(timm's default, no_embed_class=False); weights written without those entries (timm's no_embed_class=True, as in
its register models) are imported with zero entries there, which adds nothing: the same outputs.

Submodule and parameter names follow the common layout (patch_embed.proj, cls_token, dist_token, reg_token,
pos_embed, norm_pre, blocks.N.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2, norm, fc_norm, head, head_dist),
so state dicts written in that layout load with load_state_dict as they are.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vit_experiments.models.layers import Block, PatchEmbed, activation, block_param_layer
from vit_experiments.models.pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed

# name -> (depth, embed_dim, mlp_dim, num_heads), from the ViT paper (Table 1) and DeiT (Ti, S)
VARIANTS = {
    "Ti": (12, 192, 768, 3),
    "S": (12, 384, 1536, 6),
    "B": (12, 768, 3072, 12),
    "L": (24, 1024, 4096, 16),
    "H": (32, 1280, 5120, 16),
}


def _variant_help() -> str:
    names = ", ".join(VARIANTS)
    return (
        f"valid variants are {names} followed by '/<patch size>' (e.g. 'B/16', 'H/14', 'S/8'); "
        "or set variant=None and give patch_size, embed_dim, depth and num_heads"
    )


def parse_variant(variant: str) -> Tuple[str, int]:
    """'B/16' -> ('B', 16). Accepts an optional 'ViT-' prefix and any letter case of the name."""
    name, sep, patch = variant.removeprefix("ViT-").partition("/")
    canonical = {k.lower(): k for k in VARIANTS}.get(name.strip().lower())
    if canonical is None or not sep or not patch.strip().isdigit() or int(patch) <= 0:
        raise ValueError(f"unknown ViT variant {variant!r}; {_variant_help()}")
    return canonical, int(patch)


@dataclass
class ViTConfig:
    """Everything needed to build a VisionTransformer. After __post_init__ the dims are all resolved ints."""

    variant: Optional[str] = "Ti/16"
    """"Ti|S|B|L|H/<patch>": the paper's sizes; None builds a fully custom model from the fields below"""
    image_size: int = 224
    """square input side in pixels; fixes the patch grid and so the length of pos_embed"""
    patch_size: Optional[int] = None
    """side of a square patch in pixels; this and the next four override the variant's value when set (all
    required when variant is None)"""
    embed_dim: Optional[int] = None
    """token width D"""
    depth: Optional[int] = None
    """number of transformer blocks"""
    num_heads: Optional[int] = None
    """attention heads per block; D must be divisible by it"""
    mlp_dim: Optional[int] = None
    """defaults to 4 * embed_dim, the paper's ratio, for a custom model"""
    in_chans: int = 3
    """3 for RGB; 1 for grayscale corpora"""
    num_classes: Optional[int] = None
    """size of the label set; 0 gives no head (features only, e.g. CLIP's image tower). None: `vitx fit` takes it
    from the data (classes.json beside the shards); a model built with None has ImageNet's 1000 outputs"""
    pool: str = "token"
    """"token": classify from the class token (ViT); "avg": mean of the patch tokens (ViT paper's GAP variant)"""
    class_token: bool = True
    """a learned class token in front of the patches; "avg" pooling can do without it"""
    num_distill_tokens: int = 0
    """1 adds DeiT's distillation token (after the class token) and a second head, head_dist"""
    num_reg_tokens: int = 0
    """register tokens (Darcet et al. 2024) after the class and distillation tokens: extra prefix tokens that no
    head reads, where the model can keep global information instead of in low-information patches"""
    fc_norm: bool = False
    """pool="avg" only: the final LayerNorm on the pooled feature instead of on every token (timm's fc_norm)"""
    qkv_bias: bool = True
    """bias on the q, k, v projections (ViT has it; some recipes drop it)"""
    norm_eps: float = 1e-6
    """LayerNorm epsilon: 1e-6 as in the original JAX ViT (Hugging Face ports often use 1e-12)"""
    pos_embed_type: str = "learn"
    """"learn": learned 1-D embedding (ViT); "sincos": fixed 2-D sine-cosine embedding, not trained"""
    pre_norm: bool = False
    """LayerNorm after adding the position embedding, before the blocks (CLIP's image tower has it)"""
    patch_bias: bool = True
    """bias on the patch projection (CLIP's image tower has none)"""
    drop_rate: float = 0.0
    """dropout after the position embedding, in the blocks' MLP / projection, and before the head"""
    attn_drop_rate: float = 0.0
    """dropout on the attention probabilities"""
    drop_path_rate: float = 0.0
    """stochastic depth rate of the last block; rises linearly from 0 at the first (DeiT uses 0.1)"""
    head_init_zero: bool = False
    """zero-initialise the head (the ViT paper's fine-tuning recipe: start from uniform predictions)"""
    act: str = "gelu"
    """MLP activation: "gelu" (ViT, DeiT), "gelu_tanh", or "quick_gelu" (OpenAI's CLIP weights need it)"""

    def __post_init__(self):
        if self.variant is not None:
            name, patch = parse_variant(self.variant)
            depth, dim, mlp, heads = VARIANTS[name]
            self.patch_size = self.patch_size if self.patch_size is not None else patch
            self.depth = self.depth if self.depth is not None else depth
            self.embed_dim = self.embed_dim if self.embed_dim is not None else dim
            self.num_heads = self.num_heads if self.num_heads is not None else heads
            self.mlp_dim = self.mlp_dim if self.mlp_dim is not None else mlp
        else:
            missing = [f for f in ("patch_size", "embed_dim", "depth", "num_heads") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"variant=None needs {', '.join(missing)}; set them, or {_variant_help()}")
            if self.mlp_dim is None:
                self.mlp_dim = 4 * self.embed_dim
        if self.num_classes is None:
            self.num_classes = 1000
        for f in ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "in_chans"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "choose an image size that is a multiple of the patch size"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}; pick a divisor"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if self.pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True; use pool='avg' for a model without one")
        if self.num_distill_tokens not in (0, 1):
            raise ValueError(f"num_distill_tokens must be 0 or 1 (DeiT), got {self.num_distill_tokens}")
        if self.num_reg_tokens < 0:
            raise ValueError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")
        if self.fc_norm and self.pool != "avg":
            raise ValueError("fc_norm=True normalises the average-pooled feature: it needs pool='avg'")
        if self.num_distill_tokens and not self.class_token:
            raise ValueError("a distillation token needs the class token as well (DeiT); set class_token=True")
        activation(self.act)  # raises for an unknown name
        if self.pos_embed_type not in ("learn", "sincos"):
            raise ValueError(f"pos_embed_type must be 'learn' or 'sincos', got {self.pos_embed_type!r}")
        if self.pos_embed_type == "sincos" and self.embed_dim % 4 != 0:
            raise ValueError(f"pos_embed_type='sincos' needs embed_dim divisible by 4, got {self.embed_dim}")
        for f in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, f) < 1.0:
                raise ValueError(f"{f} must be in [0, 1), got {getattr(self, f)}")

    @property
    def grid_size(self) -> Tuple[int, int]:
        """(rows, cols) of the patch grid."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: the class, distillation and register tokens, when present."""
        return int(self.class_token) + self.num_distill_tokens + self.num_reg_tokens


class VisionTransformer(nn.Module):
    """ViT: patchify -> [cls, (dist,) (registers,) patches] + pos_embed -> pre-norm blocks -> LayerNorm -> head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.num_distill_tokens else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_reg_tokens, D)) if cfg.num_reg_tokens else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, cfg.num_prefix_tokens + cfg.num_patches, D), requires_grad=cfg.pos_embed_type == "learn"
        )
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        # plain Python, not torch.linspace, so that construction on the meta device works
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(
                D, cfg.num_heads, cfg.mlp_dim, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate, drop_path=rate, norm_eps=cfg.norm_eps, act_layer=activation(cfg.act),
            )
            for rate in rates
        )
        # with fc_norm the LayerNorm moves from every token to the pooled feature (timm's global_pool="avg")
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(D, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.num_distill_tokens:
            self.head_dist = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # activation checkpointing (set_grad_checkpointing): off by default
        self.grad_checkpointing = False
        self.init_weights()

    # ---- initialisation -------------------------------------------------------------------------------------

    def init_weights(self):
        """trunc_normal(0.02) for tokens, pos_embed and Linear weights; zero biases; LayerNorm ones/zeros;
        the patch projection like a Linear on the flattened patch (Xavier uniform); optionally a zero head."""
        for t in (self.cls_token, self.dist_token):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)  # as timm: registers start out (almost) equal
        with torch.no_grad():
            if self.cfg.pos_embed_type == "learn":
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            else:
                self.pos_embed.copy_(self._sincos())
        self.apply(self._init_module)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (D, C*P*P)
        if self.cfg.head_init_zero:
            self._zero_heads()

    @staticmethod
    def _init_module(m: nn.Module):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _zero_heads(self):
        for head in (self.head, getattr(self, "head_dist", None)):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def _sincos(self) -> torch.Tensor:
        pe = sincos_2d_pos_embed(self.cfg.embed_dim, self.cfg.grid_size, self.cfg.num_prefix_tokens)
        return pe.to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)  # (1, T, D)

    def no_weight_decay(self) -> set:
        """Names of parameters that should not be decayed (besides norms and biases, which any 1-D filter catches)."""
        return {n for n in ("pos_embed", "cls_token", "dist_token", "reg_token") if getattr(self, n) is not None}

    # ---- scaling hooks (timm's API): the units that checkpointing, compile and FSDP work on -------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (Chen et al. 2016): in training, each block keeps only its input and
        recomputes its activations in the backward pass (about a third more compute, activation memory that no
        longer grows with depth). Non-reentrant, RNG state preserved: dropout and drop-path draw the same masks."""
        self.grad_checkpointing = enable

    def scaling_units(self) -> List[nn.Module]:
        """The modules that are sharded (FSDP), compiled and checkpointed one by one: the transformer blocks."""
        return list(self.blocks)

    def param_layer(self, name: str) -> int:
        """Depth of a parameter for layer-wise learning-rate decay: 0 the embedding, i + 1 for blocks.i,
        num_layers() for the final norm and heads."""
        return block_param_layer(name, ("patch_embed", "cls_token", "dist_token", "reg_token", "pos_embed",
                                        "norm_pre"),
                                 self.cfg.depth)

    def num_layers(self) -> int:
        return self.cfg.depth + 1

    # ---- forward --------------------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or tuple(x.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"expected images of shape (B, {cfg.in_chans}, {cfg.image_size}, {cfg.image_size}), got "
                f"{tuple(x.shape)}; resize the inputs, or call set_image_size() to resample the position embedding"
            )
        x = self.patch_embed(x)  # (B, N, D)
        tokens = (self.cls_token, self.dist_token, self.reg_token)
        prefix = [t.expand(x.shape[0], -1, -1) for t in tokens if t is not None]
        x = torch.cat(prefix + [x], dim=1)  # (B, T, D), T = prefix + N
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False, return_logit_max: bool = False):
        """Images (B, C, H, W) -> tokens (B, T, D) after the final LayerNorm.

        With return_attention=True also returns, per block, the softmax probabilities (B, heads, T, T) computed
        on the explicit attention path (same outputs as the fused path, more memory); with return_logit_max=True
        as well, a third element: per block the (B, heads) largest pre-softmax logit (Attention's return_logit_max).
        """
        if return_logit_max and not return_attention:
            raise ValueError("return_logit_max needs return_attention=True")
        x = self.norm_pre(self._embed(x))  # (B, T, D)
        attentions: List[torch.Tensor] = []
        logit_maxes: List[torch.Tensor] = []
        for block in self.blocks:
            if return_attention:
                # (B, T, D), (B, heads, T, T) and, with return_logit_max, (B, heads)
                x, probs, *lmax = block(x, return_attention=True, return_logit_max=return_logit_max)
                attentions.append(probs)
                logit_maxes += lmax  # [(B, heads)] with return_logit_max
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # (B, T, D), activations recomputed in backward
            else:
                x = block(x)  # (B, T, D)
        x = self.norm(x)
        if return_logit_max:
            return x, attentions, logit_maxes
        return (x, attentions) if return_attention else x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the class token, or the mean over patch tokens only (prefix tokens excluded)."""
        if self.cfg.pool == "avg":
            return self.fc_norm(tokens[:, self.cfg.num_prefix_tokens :].mean(dim=1))  # registers excluded too
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> class logits (B, num_classes), or the pooled features (B, D) with pre_logits."""
        x = self.head_drop(self.pool(tokens))  # (B, D)
        return x if pre_logits else self.head(x)

    def forward_distill_heads(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """DeiT: (class-head logits, distillation-head logits), each (B, num_classes)."""
        if self.dist_token is None:
            raise ValueError("this model has no distillation token; build it with num_distill_tokens=1")
        dist = self.head_drop(tokens[:, 1])  # (B, D) the token after cls (registers follow it)
        return self.forward_head(tokens), self.head_dist(dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes). A distilled model averages its two heads (DeiT)."""
        tokens = self.forward_features(x)
        if self.dist_token is not None:
            cls_logits, dist_logits = self.forward_distill_heads(tokens)
            return (cls_logits + dist_logits) / 2
        return self.forward_head(tokens)

    # ---- adapting a trained model ---------------------------------------------------------------------------

    def reset_classifier(self, num_classes: int):
        """Replace the head (and head_dist) by zero-initialised ones for a new label set (0 = no head).

        With a zero head only the head gets a gradient on the first step; the rest follows from the second.
        Create the optimizer after calling this: it replaces parameters.
        """
        self.cfg = dataclasses.replace(self.cfg, num_classes=num_classes)
        ref = self.norm.weight
        heads = ["head"] + (["head_dist"] if self.dist_token is not None else [])
        for name in heads:
            new = nn.Linear(self.cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            setattr(self, name, new.to(device=ref.device, dtype=ref.dtype))
        self._zero_heads()

    def resample_pos_embed(self, new_image_size: int):
        """Change the input resolution, keeping the patch size: the learned position embedding is resampled by
        2-D bicubic interpolation over the patch grid (prefix tokens kept); a sin-cos one is rebuilt.

        Create the optimizer after calling this: it replaces pos_embed.
        """
        new_cfg = dataclasses.replace(self.cfg, image_size=new_image_size)  # validates the new size
        if new_cfg.grid_size != self.cfg.grid_size:
            old_grid, self.cfg = self.cfg.grid_size, new_cfg
            with torch.no_grad():
                if new_cfg.pos_embed_type == "learn":
                    pe = resample_abs_pos_embed(
                        self.pos_embed.detach(), new_cfg.grid_size, old_grid, new_cfg.num_prefix_tokens
                    )
                else:
                    pe = self._sincos()
            self.pos_embed = nn.Parameter(pe, requires_grad=self.pos_embed.requires_grad)
        self.cfg = new_cfg

    def set_image_size(self, image_size: int):
        """Same as resample_pos_embed: make the model accept images of image_size x image_size."""
        self.resample_pos_embed(image_size)


def build_vit(variant: Optional[str] = "Ti/16", **overrides) -> VisionTransformer:
    """build_vit("B/16", num_classes=10, image_size=384) -> VisionTransformer."""
    return VisionTransformer(ViTConfig(variant=variant, **overrides))
