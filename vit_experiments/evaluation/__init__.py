"""Evaluation of embedding models as pure functions on tensors (no Lightning): CLIP's zero-shot
classification and image-text retrieval."""

from .retrieval import retrieval_chance, retrieval_recall
from .templates import TEMPLATE_SETS, get_templates
from .zeroshot import DEFAULT_TEMPLATES, topk_accuracy, zeroshot_classifier, zeroshot_logits

__all__ = [
    "DEFAULT_TEMPLATES",
    "TEMPLATE_SETS",
    "get_templates",
    "retrieval_chance",
    "retrieval_recall",
    "topk_accuracy",
    "zeroshot_classifier",
    "zeroshot_logits",
]
