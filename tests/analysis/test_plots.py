"""The figures come out with the right sizes and types, and the tile image puts each tile where it belongs."""
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from vit_experiments.analysis import plots


def test_attention_distance_scatter_has_one_dot_per_head():
    d = np.arange(12, dtype=float).reshape(4, 3)  # (layers, heads)
    fig = plots.plot_attention_distance(d, image_size=(64, 64), title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert offsets.shape == (12, 2)
    assert sorted(set(offsets[:, 0])) == [1, 2, 3, 4]  # layers numbered from 1 as in the paper
    np.testing.assert_array_equal(np.sort(offsets[:, 1]), np.arange(12))
    img = plots.figure_to_array(fig)
    assert img.shape == (400, 600, 3) and img.dtype == np.uint8


def test_similarity_tiles_image_shape_and_placement():
    gh, gw, scale = 3, 4, 2
    sim = torch.full((gh, gw, gh, gw), -1.0)
    for i in range(gh):
        for j in range(gw):
            sim[i, j, i, j] = 1.0
    img = plots.similarity_tiles_image(sim, scale=scale)
    th, tw = gh * gh + gh - 1, gw * gw + gw - 1  # tiles plus 1-cell gaps
    assert img.shape == (th * scale, tw * scale, 3) and img.dtype == np.uint8
    top = (np.array(colormaps["viridis"](1.0)[:3]) * 255 + 0.5).astype(np.uint8)
    hot = np.argwhere((img == top).all(-1))
    # each tile (i, j) lights up exactly its own cell (i, j), scaled by `scale`
    cells = {(y // scale, x // scale) for y, x in hot}
    assert cells == {(i * (gh + 1) + i, j * (gw + 1) + j) for i in range(gh) for j in range(gw)}
    assert (img[gh * scale] == 255).all()  # first gap row is white
    fig = plots.plot_position_similarity(sim)
    assert isinstance(fig, Figure) and plots.figure_to_array(fig).ndim == 3


def test_rollout_overlays_and_figure():
    images = torch.randint(0, 256, (5, 3, 24, 32), dtype=torch.uint8)
    maps = torch.rand(5, 3, 4)
    over = plots.rollout_overlay_images(images, maps)
    assert over.shape == (5, 24, 32, 3) and over.dtype == np.uint8
    # alpha 0 gives back the images (or their grey levels); float inputs are min-max scaled for display
    np.testing.assert_array_equal(plots.rollout_overlay_images(images, maps, alpha=0.0, gray=False),
                                  images.permute(0, 2, 3, 1).numpy())
    grey = plots.rollout_overlay_images(images, maps, alpha=0.0)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    shown = plots.to_display_images(images.float() / 255 - 0.5)
    assert shown.dtype == np.uint8 and shown.min() == 0 and shown.max() == 255
    grid = plots.image_grid(over, ncols=3, pad=2)
    assert grid.shape == (2 * 24 + 3 * 2, 3 * 32 + 4 * 2, 3)
    fig = plots.plot_rollout(images, maps, ncols=3)
    assert isinstance(fig, Figure) and plots.figure_to_array(fig).ndim == 3
    with pytest.raises(ValueError, match="maps of shape"):
        plots.rollout_overlay_images(images, maps[:2])


def test_filter_components_grid():
    comps = torch.randn(10, 3, 4, 4)
    tiles = plots.filter_images(comps)
    assert tiles.shape == (10, 4, 4, 3) and tiles.dtype == np.uint8
    img = plots.filter_components_image(comps, ncols=5, scale=3)
    assert img.shape == (2 * 12 + 3 * 2, 5 * 12 + 6 * 2, 3)
    fig = plots.plot_filter_components(comps, torch.linspace(0.3, 0.01, 10), ncols=5)
    assert [t.get_text() for t in fig.axes[0].texts][:2] == ["30.0%", "26.8%"]
    assert plots.filter_images(torch.randn(2, 1, 4, 4)).shape == (2, 4, 4, 3)  # grayscale filters
