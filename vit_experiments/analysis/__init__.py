"""Pure-tensor analyses of Vision Transformers (no Lightning): see the modules for the papers' definitions.

Figures live in `plots`, and the all-in-one run on a probe batch with file output in `report`; they are
not imported here so that the tensor functions stay free of matplotlib.
"""
from .attention_distance import AttentionDistance, attention_distance_by_layer, mean_attention_distance
from .cka import MinibatchCKA, cka_matrix, linear_cka
from .entropy import attention_entropy, attention_nmi, entropy_by_layer, logit_max_by_layer, nmi_by_layer
from .outlier_tokens import OutlierTokens, outlier_tokens, outliers_by_layer
from .patch_filters import FilterComponents, patch_embed_components
from .position_similarity import position_similarity, topology_score
from .probes import probe_layers, ridge_probe_accuracy, train_test_split
from .rollout import attention_rollout

__all__ = [
    "AttentionDistance",
    "FilterComponents",
    "MinibatchCKA",
    "OutlierTokens",
    "attention_distance_by_layer",
    "attention_entropy",
    "attention_nmi",
    "attention_rollout",
    "cka_matrix",
    "entropy_by_layer",
    "linear_cka",
    "logit_max_by_layer",
    "mean_attention_distance",
    "nmi_by_layer",
    "outlier_tokens",
    "outliers_by_layer",
    "patch_embed_components",
    "position_similarity",
    "probe_layers",
    "ridge_probe_accuracy",
    "topology_score",
    "train_test_split",
]
