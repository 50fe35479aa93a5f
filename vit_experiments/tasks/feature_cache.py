"""Gradient accumulation that keeps the whole contrastive batch: feature caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", GradCache; open_clip's `accum_freq`).

Plain gradient accumulation over k micro-batches sums the gradients of k small contrastive problems: each image is
scored against the captions of its own micro-batch only, so CLIP's loss (which improves with the number of
negatives) sees batch B, not k B. The contrastive loss couples every row with every other, so its gradient cannot
be split by rows; it can be split at the features. With f_j the embeddings of micro-batch j and L the loss over
all of them,

    dL/dtheta = sum_j (dL/df_j) . (df_j/dtheta)

so one optimizer step over k micro-batches is

1. `cache`: each micro-batch's embeddings, computed without gradients (no activations kept), and the state of the
   random generators before it, so that its dropout and stochastic-depth draws can be replayed;
2. `loss_and_gradients`: the loss of the whole accumulated batch (gathered over devices as usual) on detached
   copies of the cached embeddings, and its gradient with respect to them and to the temperature;
3. `replay`: each micro-batch again, with gradients and the same random draws, back-propagating its cached
   gradient through the towers (a surrogate scalar sum(f_j * dL/df_j) whose gradient with respect to f_j is
   dL/df_j, so a loss scaler multiplies it like any loss).

Loss and gradients equal those of one device holding all k B pairs (per device), at the cost of a second forward
pass per micro-batch and the memory of one micro-batch's activations. Unlike open_clip's accum_freq, whose every
re-run back-propagates the whole loss into the temperature (k times its gradient), the temperature's gradient is
added once, on the last micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vit_experiments.losses import contrastive_loss

Tower = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class MicroBatch:
    images: torch.Tensor  # (B, 3, H, W) normalised, as the towers take them
    ids: torch.Tensor  # (B, L) token ids
    rng: tuple[torch.Tensor, Optional[torch.Tensor]]  # CPU and (on a GPU) CUDA generator states before its forward
    image_emb: torch.Tensor  # (B, E) without gradient
    text_emb: torch.Tensor  # (B, E) without gradient


def _rng_state(device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class FeatureCache:
    """The micro-batches of one optimizer step and their embeddings (see the module docstring)."""

    def __init__(self) -> None:
        self.batches: list[MicroBatch] = []

    def __len__(self) -> int:
        return len(self.batches)

    def clear(self) -> None:
        self.batches = []

    def pairs(self) -> int:
        """Image-caption pairs cached on this device."""
        return sum(b.ids.shape[0] for b in self.batches)

    @torch.no_grad()
    def cache(self, model: Tower, images: torch.Tensor, ids: torch.Tensor) -> None:
        """Embed one micro-batch without gradients and keep it, its embeddings and the generator states."""
        rng = _rng_state(images.device)
        image_emb, text_emb, _ = model(images, ids)  # (B, E), (B, E); draws dropout masks from the generators
        self.batches.append(MicroBatch(images, ids, rng, image_emb, text_emb))

    def loss_and_gradients(
        self, logit_scale: torch.Tensor, local: bool = True
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The contrastive loss over every cached pair (and, under data parallelism, every device's: a collective,
        so every device calls this at the same step), its gradient with respect to each micro-batch's image and
        text embeddings, and with respect to the temperature `logit_scale` (the parameter's value is used; the
        parameter itself gets no gradient here)."""
        if not self.batches:
            raise RuntimeError("no micro-batch cached: call cache() for each micro-batch of the step first")
        images = torch.cat([b.image_emb for b in self.batches]).float().requires_grad_()  # (k B, E)
        texts = torch.cat([b.text_emb for b in self.batches]).float().requires_grad_()  # (k B, E)
        scale = logit_scale.detach().float().requires_grad_()  # ()
        with torch.enable_grad():
            loss = contrastive_loss(images, texts, scale, local=local)
            g_images, g_texts, g_scale = torch.autograd.grad(loss, (images, texts, scale))
        sizes = [b.ids.shape[0] for b in self.batches]
        grads = list(zip(g_images.split(sizes), g_texts.split(sizes)))  # per micro-batch: (B, E), (B, E)
        return loss.detach(), grads, g_scale

    def replay(self, model: Tower, j: int, grads: tuple[torch.Tensor, torch.Tensor],
               scale_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Micro-batch j again, with gradients and its cached random draws: a scalar whose backward sends `grads`
        (dL/d image embeddings, dL/d text embeddings) through the towers, and `scale_grad` (dL/dt) to the
        temperature when given (on one micro-batch of the step only)."""
        b = self.batches[j]
        devices = [b.images.device] if b.images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the generators continue afterwards as the cache pass left them
            torch.set_rng_state(b.rng[0])
            if b.rng[1] is not None:
                torch.cuda.set_rng_state(b.rng[1], b.images.device)
            image_emb, text_emb, logit_scale = model(b.images, b.ids)  # (B, E), (B, E), ()
        g_images, g_texts = grads
        # d(surrogate)/d(image_emb) = g_images, etc.: the chain rule's second factor, computed by backward
        surrogate = (image_emb.float() * g_images).sum() + (text_emb.float() * g_texts).sum()
        if scale_grad is not None:
            surrogate = surrogate + logit_scale.float() * scale_grad
        return surrogate
