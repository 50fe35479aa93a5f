"""Zero-shot classification with a contrastive image-text model.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", section 3.1.2 and
3.1.4: embed each class name through prompt templates ("a photo of a {}."), average the normalised embeddings
of a class's prompts (an ensemble in embedding space) and renormalise; an image is assigned the class whose
embedding has the highest cosine similarity with the image's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# A general-purpose set for photographs, from the prompts of the CLIP paper's ImageNet ensemble. A corpus of
# another kind (drawings, satellite images, synthetic shapes) deserves its own, given in the config.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "art of the {}.",
    "itap of a {}.",
)


def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """(E, C) classifier weights: column c is the renormalised mean of the unit embeddings of the prompts of
    class c.

    encode_text: captions -> (n, E) embeddings (normalised or not; each prompt is normalised here).
    templates: format strings with one "{}" where the class name goes.
    """
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"every prompt template needs exactly one '{{}}' for the class name; bad: {bad or 'none given'}"
        )
    prompts = [t.format(name) for name in class_names for t in templates]  # class-major: C * K prompts
    chunks = [encode_text(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    emb = F.normalize(torch.cat(chunks).float(), dim=-1)  # (C * K, E)
    emb = emb.reshape(len(class_names), len(templates), -1).mean(dim=1)  # (C, E) mean over the templates
    return F.normalize(emb, dim=-1).T  # (E, C)


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, E) image embeddings, (E, C) classifier -> (N, C) cosine similarities."""
    return F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """{k: share of rows whose label is among the k highest logits}; k is capped at the number of classes."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("no samples to score")
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, kmax)
    hits = top == labels.to(top.device)[:, None]  # (N, kmax)
    return {k: hits[:, : min(k, logits.shape[1])].any(dim=1).float().mean().item() for k in ks}
