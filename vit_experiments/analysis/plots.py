"""Figures for the analyses, in the style of the ViT paper (Dosovitskiy et al. 2021).

- Fig. 11: mean attention distance against network depth, one dot per head;
- Fig. 9: position-embedding similarity as a gh x gw grid of gh x gw tiles on a shared colour scale;
- Fig. 12: attention-rollout maps over the input images;
- Fig. 10: principal components of the patch-embedding filters.

Each figure comes as a matplotlib Figure (for PNG files and TensorBoard add_figure) and, where it is an
image anyway, as an (H, W, 3) uint8 array (for TensorBoard add_image with dataformats="HWC").
Figures are built on matplotlib.figure.Figure with the Agg canvas, never through pyplot: no global
backend state, nothing left open, safe in a training process without a display.
"""
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def new_figure(figsize: Tuple[float, float], dpi: int = 100) -> Figure:
    """A Figure with an Agg canvas attached, independent of pyplot."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure -> (H, W, 3) uint8."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis",
             bad: Tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Map an array of scalars (NaN = background) through a colour map -> (..., 3) uint8."""
    v = np.asarray(values, dtype=np.float64)
    span = vmax - vmin if vmax > vmin else 1.0
    rgb = colormaps[cmap](np.clip((np.nan_to_num(v, nan=vmin) - vmin) / span, 0.0, 1.0))[..., :3]  # (..., 3)
    rgb = (rgb * 255.0 + 0.5).astype(np.uint8)
    rgb[np.isnan(v)] = bad
    return rgb


def image_grid(images: np.ndarray, ncols: Optional[int] = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile (B, H, W, 3) uint8 images into one (H', W', 3) uint8 image, row-major."""
    b, h, w, c = images.shape
    ncols = max(1, min(b, ncols or int(np.ceil(np.sqrt(b)))))
    nrows = int(np.ceil(b / ncols))
    out = np.full((nrows * h + (nrows + 1) * pad, ncols * w + (ncols + 1) * pad, c), fill, dtype=np.uint8)
    for i in range(b):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out


# --------------------------------------------------------------------------------------------------
# Fig. 11: mean attention distance against depth


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def uniform_attention_distance(grid_size: Tuple[int, int], patch_size: int) -> float:
    """Mean attention distance (pixels) of uniform attention over a gh x gw grid of `patch_size`-px patches.

    Every query spreads its attention evenly over all patch keys, so its distance is the mean distance from its
    patch centre to every patch centre; this is that mean over the queries. The reference line of the scatter:
    heads above it attend further than chance, heads below it are local.
    """
    gh, gw = int(grid_size[0]), int(grid_size[1])
    ys, xs = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    c = np.stack([ys.ravel(), xs.ravel()], axis=1)  # (gh * gw, 2) patch centres in patch units
    d = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))  # (N, N)
    return float(d.mean() * patch_size)


def plot_attention_distance(distances: ArrayLike, image_size: Optional[Tuple[int, int]] = None,
                            title: Optional[str] = None, uniform: Optional[float] = None) -> Figure:
    """Scatter of mean attention distance (pixels) against layer, one dot per head.

    distances: (layers, heads). Layers are numbered from 1 on the x axis as in the paper. Heads are told apart by
    colour and marker, and each head sits at its own small horizontal offset from the layer's tick, so heads with
    equal distances do not hide each other. With image_size (H, W), the y axis reaches at least half the image
    diagonal, so figures from different stages of training share a scale. uniform: the distance uniform attention
    gives (uniform_attention_distance), drawn as a dashed reference line.
    """
    d = _np(distances).astype(np.float64)
    if d.ndim != 2:
        raise ValueError(f"expected distances of shape (layers, heads), got {d.shape}")
    layers, heads = d.shape
    legend = heads <= 16
    fig = new_figure((max(6.0, 1.6 + 0.32 * layers) + (1.1 if legend else 0.0), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["tab20" if heads > 10 else "tab10"]
    depth = np.arange(1, layers + 1)
    spread = 0.6 if heads > 1 else 0.0  # the heads of a layer share 60% of the gap between two layers
    for h in range(heads):
        offset = spread * ((h + 0.5) / heads - 0.5)
        ax.scatter(depth + offset, d[:, h], s=22, color=cmap(h % cmap.N), marker=MARKERS[h % len(MARKERS)],
                   label=f"head {h + 1}", alpha=0.9, edgecolors="black", linewidths=0.3)
    if uniform is not None and np.isfinite(uniform):
        ax.axhline(uniform, color="0.35", linestyle="--", linewidth=1.0, label="uniform attention")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_xticks(depth if layers <= 16 else depth[:: int(np.ceil(layers / 12))])
    ax.set_xlim(0.5, layers + 0.5)
    top = np.nanmax(d) if np.isfinite(d).any() else 1.0
    if image_size is not None:
        top = max(top, 0.5 * float(np.hypot(*image_size)))
    if uniform is not None and np.isfinite(uniform):
        top = max(top, uniform)
    ax.set_ylim(0, top * 1.05 + 1e-6)
    ax.grid(alpha=0.3)
    if legend:  # outside the axes: early layers' local heads sit at the bottom, late ones at the top
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    elif uniform is not None:
        ax.legend(handles=ax.get_lines(), fontsize=7, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Fig. 9: position-embedding similarity tiles


def similarity_mosaic(sim: ArrayLike, gap: int = 1) -> np.ndarray:
    """Arrange a (gh, gw, gh, gw) similarity array as tiles -> 2-D float array, NaN between tiles.

    Tile (i, j) sits at grid row i, column j and shows the similarity of patch (i, j) to every patch.
    """
    s = _np(sim).astype(np.float64)
    if s.ndim != 4:
        raise ValueError(f"expected a (gh, gw, gh, gw) similarity array, got shape {s.shape}")
    gh, gw = s.shape[:2]
    th, tw = s.shape[2:]
    out = np.full((gh * th + (gh - 1) * gap, gw * tw + (gw - 1) * gap), np.nan)
    for i in range(gh):
        for j in range(gw):
            y, x = i * (th + gap), j * (tw + gap)
            out[y:y + th, x:x + tw] = s[i, j]
    return out


def similarity_tiles_image(sim: ArrayLike, scale: int = 4, vmin: float = -1.0, vmax: float = 1.0,
                           cmap: str = "viridis") -> np.ndarray:
    """The Fig. 9 grid of tiles as an (H, W, 3) uint8 image, each cell `scale` pixels, shared colour scale."""
    mosaic = similarity_mosaic(sim, gap=1)  # (h, w)
    big = np.kron(mosaic, np.ones((scale, scale)))  # (h * scale, w * scale) nearest-neighbour upscale
    return colorize(big, vmin, vmax, cmap)


def plot_position_similarity(sim: ArrayLike, vmin: float = -1.0, vmax: float = 1.0, cmap: str = "viridis",
                             title: Optional[str] = "Position embedding similarity") -> Figure:
    """Fig. 9: gh x gw grid of tiles with a shared colour bar; axes are the input patch row and column."""
    s = _np(sim)
    mosaic = similarity_mosaic(s, gap=1)
    gh, gw, th, tw = s.shape
    # about 0.55 in (55 px at 100 dpi) per tile from an 8 x 8 to a 16 x 16 grid, so every tile stays readable
    side = float(np.clip(0.55 * max(gh, gw) + 1.5, 5.4, 10.5))
    fig = new_figure((side + 0.9, side))
    ax = fig.add_subplot(1, 1, 1)
    cm = colormaps[cmap].with_extremes(bad="white")
    im = ax.imshow(mosaic, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
    step = max(1, int(np.ceil(max(gh, gw) / 14)))  # keep tick labels legible for large grids
    ax.set_xticks([j * (tw + 1) + (tw - 1) / 2 for j in range(0, gw, step)], [str(j + 1) for j in range(0, gw, step)])
    ax.set_yticks([i * (th + 1) + (th - 1) / 2 for i in range(0, gh, step)], [str(i + 1) for i in range(0, gh, step)])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Fig. 12: attention rollout over the input images


def to_display_images(images: ArrayLike) -> np.ndarray:
    """(B, C, H, W) images -> (B, H, W, 3) uint8 for display.

    uint8 input is used as is; float input (e.g. mean/std-normalised) is min-max scaled per image,
    which is enough to recognise the content. One channel is repeated to three.
    """
    is_uint8 = (images.dtype == torch.uint8) if isinstance(images, torch.Tensor) else images.dtype == np.uint8
    x = _np(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1|3, H, W), got {x.shape}")
    x = np.transpose(x, (0, 2, 3, 1))  # (B, H, W, C)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if is_uint8:
        return x.astype(np.uint8)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return ((x - lo) / np.maximum(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)


def rollout_overlay_images(images: ArrayLike, maps: ArrayLike, alpha: float = 0.5,
                           cmap: str = "jet", gray: bool = True) -> np.ndarray:
    """Blend each image with its rollout map -> (B, H, W, 3) uint8.

    images: (B, C, H, W) uint8 or float; maps: (B, gh, gw). Each map is min-max normalised and
    upsampled bilinearly to the image size, then drawn as a heat map over the image -- over its grey
    levels by default, so that the image's own colours cannot be mistaken for attention.
    """
    imgs = to_display_images(images)  # (B, H, W, 3)
    if gray:
        luma = imgs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (B, H, W)
        imgs = np.repeat((luma + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    m = torch.as_tensor(_np(maps), dtype=torch.float32)
    if m.ndim != 3 or m.shape[0] != imgs.shape[0]:
        raise ValueError(f"expected maps of shape (B={imgs.shape[0]}, gh, gw), got {tuple(m.shape)}")
    b, h, w, _ = imgs.shape
    lo = m.amin((1, 2), keepdim=True)
    hi = m.amax((1, 2), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)  # (B, gh, gw) in [0, 1]
    up = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    heat = colorize(up.clamp(0, 1).numpy(), 0.0, 1.0, cmap).astype(np.float32)  # (B, H, W, 3)
    out = (1.0 - alpha) * imgs.astype(np.float32) + alpha * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def plot_rollout(images: ArrayLike, maps: ArrayLike, ncols: int = 4, alpha: float = 0.5, cmap: str = "jet",
                 title: Optional[str] = "Attention rollout") -> Figure:
    """Each probe image beside its rollout overlay, `ncols` pairs per row, with the heat map's colour scale.

    Each map is min-max scaled over its own image (rollout_overlay_images), so the colour bar reads from the
    least to the most attended patch of that image. Drawn as one mosaic (one image on one axes: a fraction of
    the time of an axes per picture), each picture about 110 px high whatever the image size.
    """
    imgs = to_display_images(images)  # (B, H, W, 3)
    over = rollout_overlay_images(images, maps, alpha, cmap=cmap)  # (B, H, W, 3)
    b, h, w, _ = imgs.shape
    ncols = max(1, min(ncols, b))
    gap = max(1, w // 16)
    pairs = np.concatenate([imgs, np.full((b, h, gap, 3), 255, np.uint8), over], axis=2)  # (B, H, 2W + gap, 3)
    pad = max(2, w // 6)
    mosaic = image_grid(pairs, ncols=ncols, pad=pad)  # (rows, cols, 3)
    scale = 110.0 / h / 100.0  # inches per image pixel at 100 dpi
    width, height = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    top = 0.45 if title else 0.3  # room for the title and the "input / rollout" labels
    fig = new_figure((width + 1.0, height + top + 0.1))
    fw, fh = width + 1.0, height + top + 0.1
    ax = fig.add_axes((0.0, 0.1 / fh, width / fw, height / fh))
    ax.imshow(mosaic, interpolation="nearest" if h < 64 else "antialiased")
    ax.set_axis_off()
    for c in range(ncols):  # column labels over the first row
        x0 = pad + c * (2 * w + gap + pad)
        for k, label in enumerate(("input", "rollout")):
            ax.text(x0 + k * (w + gap) + w / 2, pad - 2, label, ha="center", va="bottom", fontsize=8)
    bar = fig.add_axes(((width + 0.25) / fw, 0.1 / fh + 0.1 * height / fh, 0.15 / fw, 0.8 * height / fh))
    bar.imshow(np.linspace(1.0, 0.0, 256)[:, None], aspect="auto", cmap=cmap, extent=(0, 1, 0, 1))
    bar.set_xticks([])
    bar.yaxis.tick_right()
    bar.set_yticks([0, 1], ["min", "max"], fontsize=7)
    bar.set_ylabel("rollout (per image)", fontsize=7)
    bar.yaxis.set_label_position("right")
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.05 / fh, va="top")
    return fig


# --------------------------------------------------------------------------------------------------
# Fig. 10: principal components of the patch-embedding filters


def filter_images(components: ArrayLike) -> np.ndarray:
    """(k, C, P, P) components -> (k, P, P, 3) uint8, each scaled symmetrically around 0 (grey = 0).

    Three channels are shown as RGB; any other channel count shows channel 0 in grey.
    """
    c = _np(components).astype(np.float64)
    if c.ndim != 4:
        raise ValueError(f"expected components of shape (k, C, P, P), got {c.shape}")
    c = c[:, :3] if c.shape[1] >= 3 else np.repeat(c[:, :1], 3, axis=1)  # (k, 3, P, P)
    peak = np.abs(c).max(axis=(1, 2, 3), keepdims=True)
    c = 0.5 + 0.5 * c / np.maximum(peak, 1e-12)  # [-peak, peak] -> [0, 1]
    return (np.transpose(c, (0, 2, 3, 1)) * 255.0 + 0.5).astype(np.uint8)


def filter_components_image(components: ArrayLike, ncols: int = 7, scale: int = 4) -> np.ndarray:
    """The components as one (H, W, 3) uint8 grid image, each pixel upscaled `scale` times."""
    tiles = filter_images(components)  # (k, P, P, 3)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    return image_grid(tiles, ncols=ncols, pad=2)


def plot_filter_components(components: ArrayLike, explained_variance_ratio: Optional[ArrayLike] = None,
                           ncols: int = 7,
                           title: Optional[str] = "RGB embedding filters (principal components)") -> Figure:
    """Fig. 10 (left): one small image per principal component, labelled with its explained variance."""
    tiles = filter_images(components)  # (k, P, P, 3)
    k, p = tiles.shape[:2]
    scale = max(1, 32 // p)
    pad = 2 * scale + 6  # room for the label above each tile
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    ncols = max(1, min(ncols, k))
    mosaic = image_grid(tiles, ncols=ncols, pad=pad)
    size = p * scale
    width = 1.0 * ncols + 0.2
    fig = new_figure((width, width * mosaic.shape[0] / mosaic.shape[1] + (0.4 if title else 0.0)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.92 if title else 1.0))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    if explained_variance_ratio is not None:
        ratio = _np(explained_variance_ratio)
        for i in range(k):
            r, c = divmod(i, ncols)
            x = pad + c * (size + pad) + size / 2
            y = pad + r * (size + pad) - 1
            ax.text(x, y, f"{100 * float(ratio[i]):.1f}%", ha="center", va="bottom", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig
