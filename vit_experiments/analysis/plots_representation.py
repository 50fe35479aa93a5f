"""Figures of the attention-statistics and representation analyses, rendered to (H, W, 3) uint8 images.

Attention entropy, NMI and the logit maximum (analysis/entropy.py; Zhai et al. 2023, Park et al. 2023); high-norm
outlier tokens and where they sit (analysis/outlier_tokens.py; Darcet et al. 2024); linear CKA between layers,
within a model and between two (analysis/cka.py; Kornblith et al. 2019, Raghu et al. 2021 Fig. 1); per-layer
linear-probe accuracy (analysis/probes.py). Every figure has labelled axes and colour bars with units.

Built on matplotlib.figure.Figure with the Agg canvas, never pyplot: no global state, safe in a training process.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .plots import figure_to_array, new_figure


def _ticks(n: int, start: int = 1) -> np.ndarray:
    step = max(1, int(np.ceil(n / 12)))
    return np.arange(0, n, step), np.arange(start, n + start, step)


def _heatmap(fig: Figure, ax, values: np.ndarray, vmin: float, vmax: float, cmap: str, label: str):
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label, fraction=0.046, pad=0.04)
    return im


def plot_attention_statistics(entropy: np.ndarray, nmi: Optional[np.ndarray], logit_max: Optional[np.ndarray],
                              max_entropy: float) -> np.ndarray:
    """Entropy (layers x heads, nats, colour scale 0..log T), NMI (0..1) and the largest logit per layer."""
    e = np.asarray(entropy, dtype=np.float64)
    layers, heads = e.shape
    panels = 1 + (nmi is not None) + (logit_max is not None)
    fig = new_figure((4.0 * panels + 0.6, 3.8))
    i = 1
    for values, title, vmax, label in ((e, f"Attention entropy (uniform = log T = {max_entropy:.2f})", max_entropy,
                                        "entropy (nats)"),
                                       (nmi, "Attention NMI (query vs key position)", None, "NMI")):
        if values is None:
            continue
        ax = fig.add_subplot(1, panels, i)
        i += 1
        values = np.asarray(values, dtype=np.float64)
        if vmax is None:  # NMI is often far below 1: scale to the largest head so the pattern shows
            vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        _heatmap(fig, ax, values.T, 0.0, max(vmax, 1e-6), "viridis", label)
        ax.set_xlabel("Layer")
        ax.set_ylabel("Head")
        xt, xl = _ticks(layers)
        ax.set_xticks(xt, labels=xl)
        yt, yl = _ticks(heads)
        ax.set_yticks(yt, labels=yl)
        ax.set_title(title, fontsize=9)
    if logit_max is not None:
        ax = fig.add_subplot(1, panels, i)
        ax.plot(np.arange(1, layers + 1), np.asarray(logit_max, dtype=np.float64), marker="o", color="tab:red")
        ax.set_xlabel("Layer")
        ax.set_ylabel("Largest pre-softmax logit")
        ax.set_xticks(np.arange(1, layers + 1)[:: max(1, int(np.ceil(layers / 12)))])
        ax.set_title("Attention logit maximum", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_array(fig)


def _display(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) uint8 or float -> (B, H, W, 3) uint8 (float min-max scaled per image)."""
    x = np.asarray(images)
    is_uint8 = x.dtype == np.uint8
    x = np.transpose(x, (0, 2, 3, 1)).astype(np.float64)  # (B, H, W, C)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if not is_uint8:
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-12) * 255.0
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def plot_outlier_tokens(share: np.ndarray, images: np.ndarray, mask: np.ndarray, layer: int,
                        patch_size: int, k: float, max_images: int = 8) -> np.ndarray:
    """Left: share of outlier patch tokens per layer. Right: the probe images with the outlier patches of `layer`
    (numbered from 1) outlined in red. mask: (B, gh, gw) bool of that layer."""
    s = np.asarray(share, dtype=np.float64)
    imgs = _display(images)[:max_images]
    m = np.asarray(mask, dtype=bool)[: len(imgs)]
    ncols = min(4, len(imgs))
    nrows = int(np.ceil(len(imgs) / ncols))
    fig = new_figure((4.2 + 1.9 * ncols, max(3.6, 2.2 * nrows + 0.6)))
    grid = fig.add_gridspec(nrows, ncols + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.bar(np.arange(1, len(s) + 1), 100.0 * s, color="tab:purple")
    ax.set_xlabel("Layer")
    ax.set_ylabel(f"Outlier patch tokens (%), norm > median + {k:g} MAD")
    ax.set_xticks(np.arange(1, len(s) + 1)[:: max(1, int(np.ceil(len(s) / 12)))])
    ax.set_ylim(0, max(1.0, 100.0 * s.max() * 1.15))
    ax.grid(alpha=0.3, axis="y")
    ax.set_title("High-norm tokens per layer", fontsize=9)
    for b, img in enumerate(imgs):
        a = fig.add_subplot(grid[b // ncols, 2 + b % ncols])
        a.imshow(img)
        for r, c in zip(*np.nonzero(m[b])):
            a.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                  fill=False, edgecolor="red", linewidth=1.5))
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(f"image {b + 1}: {int(m[b].sum())}", fontsize=8)
    fig.suptitle(f"Outlier tokens of layer {layer} outlined", fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


def plot_cka(within: np.ndarray, compare: Optional[np.ndarray] = None,
             names: Sequence[str] = ("model", "compared")) -> np.ndarray:
    """Layer x layer CKA heatmap (index 0 = embedding), and beside it the model-vs-model one when given."""
    mats = [(np.asarray(within, dtype=np.float64), f"Linear CKA within {names[0]}", names[0], names[0])]
    if compare is not None:
        mats.append((np.asarray(compare, dtype=np.float64), f"Linear CKA: {names[0]} vs {names[1]}",
                     names[0], names[1]))
    fig = new_figure((4.8 * len(mats), 4.2))
    for i, (m, title, rows, cols) in enumerate(mats):
        ax = fig.add_subplot(1, len(mats), i + 1)
        _heatmap(fig, ax, m, 0.0, 1.0, "magma", "CKA")
        ax.invert_yaxis()  # layer 0 at the bottom left, as in Raghu et al. 2021
        yt, yl = _ticks(m.shape[0], start=0)
        xt, xl = _ticks(m.shape[1], start=0)
        ax.set_yticks(yt, labels=yl)
        ax.set_xticks(xt, labels=xl)
        ax.set_ylabel(f"{rows} layer (0 = embedding)")
        ax.set_xlabel(f"{cols} layer (0 = embedding)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return figure_to_array(fig)


def plot_probes(cls_accuracy: Optional[np.ndarray], patch_accuracy: Optional[np.ndarray], chance: float,
                num_train: int, num_test: int) -> np.ndarray:
    """Linear-probe test accuracy against layer, for the class token and the mean patch token; `chance`: the
    majority-class rate of the test part, drawn dashed."""
    fig = new_figure((5.6, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for acc, label, colour in ((cls_accuracy, "class token", "tab:blue"), (patch_accuracy, "mean patch token",
                                                                          "tab:orange")):
        if acc is not None:
            a = np.asarray(acc, dtype=np.float64)
            ax.plot(np.arange(1, len(a) + 1), a, marker="o", label=label, color=colour)
    ax.axhline(chance, color="0.4", linestyle="--", linewidth=1.0, label="majority class of the test half")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Layer")
    ax.set_ylabel("Probe test accuracy")
    ax.set_title(f"Ridge probes per layer ({num_train} train / {num_test} test images)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return figure_to_array(fig)
