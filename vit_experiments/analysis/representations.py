"""Every layer's output on a set of images, and the two analyses built on them: CKA between layers and linear probes.

Minibatch linear CKA (Kornblith et al. 2019; Nguyen et al. 2021, analysis/cka.py) between the layers of one model
and, given a second model, between its layers and the other's; ridge probes (analysis/probes.py) on each layer's
class token and mean patch token, fitted and scored on disjoint halves of a labelled image set.

Conventions. Layer 0 is the embedding (the input of the first block: patches + prefix tokens + position embedding,
after norm_pre); layer i is the output of block i (the residual stream, before the final LayerNorm). For CKA an
image's representation at a layer is all its tokens, prefix tokens included, flattened to one T * D vector, and
the Gram matrices are taken per minibatch of `batch_size` images, so memory stays at one minibatch of activations
whatever the number of images. Probes use layers 1..L.

The layer outputs are read with forward hooks on model.blocks (the blocks are not changed); the model needs
the VisionTransformer interface (forward_features, blocks, cfg.num_prefix_tokens).
"""
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .cka import MinibatchCKA, gram_linear
from .probes import probe_layers, train_test_split


class LayerOutputs:
    """Context manager: while active, records the embedding and each block's output of every forward pass.

    with LayerOutputs(model) as rec: model.forward_features(x); rec.outputs -> [(B, T, D)] * (depth + 1)
    """

    def __init__(self, model: nn.Module):
        blocks = getattr(model, "blocks", None)
        if blocks is None or len(blocks) == 0:
            raise TypeError(f"{type(model).__name__} has no `blocks`: the representation analyses need a "
                            "VisionTransformer")
        self.blocks = list(blocks)
        self.outputs: List[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "LayerOutputs":
        self.outputs = []
        self._handles.append(self.blocks[0].register_forward_pre_hook(self._pre))
        self._handles += [b.register_forward_hook(self._post) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module, args):
        self.outputs.append(args[0].detach())  # (B, T, D) the embedding

    def _post(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output  # return_attention gives (x, probs, ...)
        self.outputs.append(out.detach())  # (B, T, D)


def _chunks(n: int, batch_size: int) -> List[slice]:
    """Minibatches of batch_size; a remainder under 4 (too few for the unbiased HSIC) joins the previous one."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 4:
        starts.pop()
    return [slice(s, e) for s, e in zip(starts, starts[1:] + [n])]


def _run(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    param = next(model.parameters())
    with LayerOutputs(model) as rec:
        model.forward_features(images.to(param.device, param.dtype))
    return [h.float() for h in rec.outputs]  # (depth + 1) x (n, T, D)


def _prefix(model: nn.Module) -> int:
    return int(model.cfg.num_prefix_tokens)


@torch.no_grad()
def representation_analysis(
    model: nn.Module,
    images: Optional[torch.Tensor] = None,
    *,
    hidden: Optional[Sequence[torch.Tensor]] = None,
    labels: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
    compare: Optional[nn.Module] = None,
    compare_images: Optional[torch.Tensor] = None,
    batch_size: int = 64,
    probe_alpha: float = 0.1,
    probe_test_fraction: float = 0.5,
    min_probe_images: int = 20,
) -> Dict[str, Any]:
    """CKA within the model (and against `compare`) and, given labels, per-layer probes.

    images: (M, C, H, W) normalised for `model`; or hidden: its layer outputs already computed (depth + 1 tensors
    (M, T, D), layer 0 the embedding), which saves a forward pass. compare_images: the same M images prepared for
    `compare` (its own size and normalisation), in the same order. labels: (M,) class indices, for the probes.
    Returns {"cka": {...}, "probe": {...} or None, "probe_skipped": why not, or None}. The models are put in eval
    mode for the passes and restored.
    """
    if batch_size < 4:
        raise ValueError(f"batch_size must be >= 4 (the unbiased HSIC), got {batch_size}")
    if (images is None) == (hidden is None):
        raise ValueError("give either images or hidden (the layer outputs), not both")
    if (compare is None) != (compare_images is None):
        raise ValueError("a compared model needs its own copy of the images (compare_images), and vice versa")
    n = int(images.shape[0] if images is not None else hidden[0].shape[0])
    if compare_images is not None and compare_images.shape[0] != n:
        raise ValueError(f"compare_images has {compare_images.shape[0]} images, the model's set {n}")
    if labels is not None and labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} images")
    models = [m for m in (model, compare) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    acc = MinibatchCKA()
    cls_feats: List[List[torch.Tensor]] = []  # per chunk, per layer: (n_chunk, D)
    patch_feats: List[List[torch.Tensor]] = []
    p = _prefix(model)
    try:
        for part in _chunks(n, batch_size) if n >= 4 else []:
            hs = [h[part].float() for h in hidden] if hidden is not None else _run(model, images[part])
            grams = torch.stack([gram_linear(h) for h in hs])  # (L + 1, n_b, n_b)
            other = None
            if compare is not None:
                other = torch.stack([gram_linear(h) for h in _run(compare, compare_images[part])])  # (L' + 1, ...)
            acc.update(grams, other)
            if labels is not None:
                cls_feats.append([h[:, 0].cpu() for h in hs[1:]] if p > 0 else [])
                patch_feats.append([h[:, p:].mean(1).cpu() for h in hs[1:]])  # (n_b, D) mean over patch tokens
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)

    out: Dict[str, Any] = {"cka": None, "probe": None, "probe_skipped": None}
    if acc.batches:
        cross = acc.cross_cka()
        out["cka"] = {
            "within": acc.cka().cpu().numpy(),  # (L + 1, L + 1), index 0 = embedding
            "compare": None if cross is None else cross.cpu().numpy(),  # (L + 1, L' + 1)
            "num_images": n,
            "num_minibatches": acc.batches,
            "features": "all tokens of an image, flattened; layer 0 = embedding, layer i = block i output",
            "estimator": "unbiased HSIC (Song et al. 2012), summed over minibatches (Nguyen et al. 2021)",
        }
    if labels is None:
        out["probe_skipped"] = "no labels"
        return out
    labels = labels.long().cpu()
    classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if n < min_probe_images or torch.unique(labels).numel() < 2:
        out["probe_skipped"] = f"{n} labelled images, {torch.unique(labels).numel()} classes: too few for a probe"
        return out
    split = train_test_split(n, probe_test_fraction)
    layer_feats = [torch.cat([c[i] for c in patch_feats]) for i in range(len(patch_feats[0]))]  # L x (n, D)
    probe = {
        "patch_accuracy": probe_layers(layer_feats, labels, split, classes, probe_alpha).numpy(),  # (L,)
        "cls_accuracy": None,
        "num_train": int(len(split.train)),
        "num_test": int(len(split.test)),
        "num_classes": classes,
        "chance": float(torch.bincount(labels[split.test], minlength=classes).max()) / len(split.test),
        "alpha": probe_alpha,
    }
    if p > 0:
        cls = [torch.cat([c[i] for c in cls_feats]) for i in range(len(cls_feats[0]))]
        probe["cls_accuracy"] = probe_layers(cls, labels, split, classes, probe_alpha).numpy()
    out["probe"] = probe
    return out
