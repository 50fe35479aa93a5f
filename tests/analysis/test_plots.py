"""The figures come out with the right sizes and types, and the tile image puts each tile where it belongs."""
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from vit_experiments.analysis import plots


def test_attention_distance_scatter_has_one_dot_per_head_and_heads_apart():
    d = np.full((4, 3), 5.0)  # (layers, heads), every head at the same distance: they must not hide each other
    fig = plots.plot_attention_distance(d, image_size=(64, 64), title="t", uniform=20.0)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    offsets = np.concatenate([c.get_offsets() for c in ax.collections])
    assert offsets.shape == (12, 2)
    assert len({tuple(p) for p in offsets}) == 12  # twelve distinct dots
    np.testing.assert_array_equal(np.round(offsets[:, 0]), [1, 2, 3, 4] * 3)  # layers from 1
    assert np.abs(offsets[:, 0] - np.round(offsets[:, 0])).max() < 0.5  # each dot beside its layer's tick
    markers = {c.get_paths()[0].vertices.tobytes() for c in ax.collections}
    assert len(markers) == 3  # a marker per head, not only a colour
    (line,) = ax.get_lines()
    assert line.get_ydata()[0] == 20.0 and "uniform attention" in [t.get_text() for t in ax.get_legend().texts]
    img = plots.figure_to_array(fig)
    assert img.dtype == np.uint8 and img.shape[1] >= 600 and img.shape[0] >= 400


def test_uniform_attention_distance():
    assert plots.uniform_attention_distance((1, 1), 16) == 0.0
    assert plots.uniform_attention_distance((1, 2), 8) == pytest.approx(4.0)  # half the pairs are 8 px apart
    # brute force on a 3 x 4 grid of 4-px patches
    cy, cx = np.meshgrid(np.arange(3) * 4.0, np.arange(4) * 4.0, indexing="ij")
    c = np.stack([cy.ravel(), cx.ravel()], 1)
    ref = np.mean([np.hypot(*(a - b)) for a in c for b in c])
    assert plots.uniform_attention_distance((3, 4), 4) == pytest.approx(ref)


@pytest.mark.parametrize("layers, heads", [(4, 3), (24, 16)])
def test_attention_distance_scatter_reads_from_4_to_24_layers(layers, heads):
    d = np.random.default_rng(0).uniform(0, 20, (layers, heads))
    fig = plots.plot_attention_distance(d, image_size=(32, 32), uniform=16.5)
    ax = fig.axes[0]
    assert len(ax.get_xticks()) <= 16  # no crowded tick labels at 24 layers
    assert plots.figure_to_array(fig).shape[1] >= 600


@pytest.mark.parametrize("grid", [8, 14, 16])
def test_position_similarity_figure_keeps_tiles_readable(grid):
    fig = plots.plot_position_similarity(torch.rand(grid, grid, grid, grid) * 2 - 1)
    ax, bar = fig.axes  # the tiles and their colour bar
    assert bar.get_ylabel() == "Cosine similarity"
    assert ax.get_xlabel() == "Input patch column" and ax.get_ylabel() == "Input patch row"
    width = plots.figure_to_array(fig).shape[1]
    tile = width * ax.get_position().width / grid
    assert tile >= 40, f"{grid}x{grid} tiles of {tile:.0f} px"


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
    # each input beside its overlay, and the heat map's colour scale
    ax, bar = fig.axes
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("input") == 3 and labels.count("rollout") == 3  # over each column of pairs
    shown = ax.get_images()[0].get_array()
    assert shown.shape[1] == 3 * (2 * 32 + 2) + 4 * 5  # 3 pairs (input, gap, overlay) per row and their padding
    assert "rollout" in bar.get_ylabel()
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
