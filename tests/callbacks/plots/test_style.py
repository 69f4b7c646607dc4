"""The shared figure style: when scales turn logarithmic, colours per layer, wrapped titles."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import LogNorm, Normalize, SymLogNorm

from lightning_probes.callbacks.plots.style import (
    color_norm,
    labelled_colorbar,
    layer_colors,
    layer_markers,
    set_scale,
    spans_decades,
    styled_figure,
    wrap,
)


def test_spans_decades_ignores_zeros_non_finite_values_and_sign_crossings():
    assert spans_decades([0.1, 9.5e10])
    assert not spans_decades([0.5, 2.0, 0.0, np.nan, np.inf])
    assert not spans_decades([3.0])
    g = np.random.default_rng(0)
    assert not spans_decades(g.standard_normal(10_000))  # crosses 0: tiny |v| are no decades
    assert spans_decades(g.standard_normal(1000) * np.logspace(-6, 0, 1000))


def test_color_norm_picks_log_symlog_or_linear_with_explicit_limits():
    norm = color_norm([0.05, 3.0, 9.5e10, np.nan])
    assert isinstance(norm, LogNorm) and (norm.vmin, norm.vmax) == (0.05, 9.5e10)
    norm = color_norm([-2.0, 0.5, 1.0])
    assert type(norm) is Normalize and (norm.vmin, norm.vmax) == (-2.0, 2.0)
    norm = color_norm([0.2, 0.4], symmetric=True)
    assert (norm.vmin, norm.vmax) == (-0.4, 0.4)
    spread = np.concatenate([np.logspace(-6, 2, 50), -np.logspace(-6, 2, 50)])
    norm = color_norm(spread)
    assert isinstance(norm, SymLogNorm) and (norm.vmin, norm.vmax) == (-100.0, 100.0)
    norm = color_norm([0.3, 0.9])
    assert type(norm) is Normalize and (norm.vmin, norm.vmax) == (0.3, 0.9)
    assert (color_norm([np.nan]).vmin, color_norm([1.0, 1.0]).vmax) == (0.0, 2.0)


def test_set_scale_on_an_axis():
    fig = styled_figure()
    ax = fig.add_subplot()
    assert set_scale(ax, "y", [1e-4, 1.0]) == "log" and ax.get_yscale() == "log"
    assert set_scale(ax, "x", [-1.0, 1e-6, 2e-3, 1e3]) == "symlog"
    assert set_scale(ax, "x", [0.1, 0.7]) == "linear"
    assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"


def test_colour_bars_need_a_label():
    fig = styled_figure()
    ax = fig.add_subplot()
    image = ax.imshow(np.eye(3))
    with pytest.raises(ValueError, match="non-empty colour bar `label`"):
        labelled_colorbar(fig, image, ax, "")


@pytest.mark.parametrize("n", [1, 10, 13, 20, 40])
def test_layer_colours_are_distinct(n):
    colors = layer_colors(n)
    assert len(colors) == n and len({tuple(np.round(c, 3)) for c in colors}) == n
    assert len(layer_markers(n)) == n


def test_wrap_breaks_long_names_at_dots():
    text = "step 12: centred kernel of encoder.layers.11.self_attention.output_projection"
    lines = wrap(text, 30).split("\n")
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert all(len(line) <= 30 for line in lines)
