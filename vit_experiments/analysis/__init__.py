"""Pure-tensor analyses of Vision Transformers (no Lightning): see the modules for the papers' definitions.

Figures live in `plots`, and the all-in-one run on a probe batch with file output in `report`; they are
not imported here so that the tensor functions stay free of matplotlib.
"""
from .attention_distance import AttentionDistance, attention_distance_by_layer, mean_attention_distance
from .patch_filters import FilterComponents, patch_embed_components
from .position_similarity import position_similarity, topology_score
from .rollout import attention_rollout

__all__ = [
    "AttentionDistance",
    "FilterComponents",
    "attention_distance_by_layer",
    "attention_rollout",
    "mean_attention_distance",
    "patch_embed_components",
    "position_similarity",
    "topology_score",
]
