"""One style for every probe's figure: layout, colour scales, colour bars, legends, colours.

Every figure is drawn on a bare ``Figure`` (:func:`lightning_probes.logging.new_figure`, never
pyplot) with matplotlib's *constrained* layout, so that tick labels, axis labels, colour bars
and legends outside the axes all fit inside the saved image. Colour scales turn logarithmic
where the values span decades (:func:`color_norm`), every colour bar says what it shows
(:func:`labelled_colorbar`), and legends sit beside the data, never on it (:func:`legend_outside`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_probes import logging as plog

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.cm import ScalarMappable
    from matplotlib.colorbar import Colorbar
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

DECADES = 2.0
"""Values whose largest and smallest magnitudes differ by more than this many powers of ten get
a logarithmic colour scale or axis."""
LABEL_SIZE = 7.0
"""Font size (points) of tick labels that name layers (names can be long, and many)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
DIVERGING, SEQUENTIAL = "RdBu_r", "viridis"


def styled_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A bare figure (:func:`~lightning_probes.logging.new_figure`) with constrained layout.

    Constrained layout makes room for every label, colour bar and outside legend when the
    figure is drawn, which ``tight_layout`` (called once, before colour bars are added) and the
    default fixed margins do not.

    Args:
        width: Width in inches (100 dpi).
        height: Height in inches.

    Returns:
        The figure.
    """
    fig = plog.new_figure(width, height)
    fig.set_layout_engine("constrained")
    return fig


def spans_decades(values: Any, decades: float = DECADES) -> bool:
    r"""Whether the finite, non-zero magnitudes of ``values`` span more than ``decades``.

    .. math:: \log_{10} \frac{\max |v|}{\min_{v \neq 0} |v|} > \text{decades}

    For values of both signs, the median magnitude stands for the minimum (values that cross
    zero always come close to it: that alone is no reason for a log scale).

    Args:
        values: Any array-like.
        decades: Powers of ten.

    Returns:
        ``False`` for fewer than two finite non-zero values.

    Example:
        >>> spans_decades([1.0, 10.0, 1e4]), spans_decades([0.2, 0.9])
        (True, False)
        >>> spans_decades([-1.0, -1e-9, 0.5, 2.0])
        False
    """
    raw = np.asarray(values, dtype=np.float64)
    raw = raw[np.isfinite(raw)]
    v = np.abs(raw[raw != 0])
    if v.size < 2:
        return False
    # signed values pass near zero, so their smallest magnitudes say nothing: compare with
    # the median magnitude instead
    low = float(np.median(v)) if raw.min() < 0 < raw.max() else float(v.min())
    return float(np.log10(v.max() / low)) > decades


def color_norm(values: Any, *, symmetric: bool = False, decades: float = DECADES) -> Normalize:
    """The colour normalisation of ``values``: logarithmic where they span decades.

    * all finite values > 0 and spanning decades: ``LogNorm(min, max)``;
    * signed (or ``symmetric``) values: symmetric about zero, ``[-m, m]`` with
      ``m = max |v|`` — ``SymLogNorm`` where the magnitudes span decades (linear below the
      10th percentile of the non-zero magnitudes, at least ``1e-6 m``), else linear;
    * otherwise linear over ``[min, max]``.

    Args:
        values: Any array-like (non-finite entries ignored).
        symmetric: Centre the scale on zero even if every value has one sign.
        decades: See :func:`spans_decades`.

    Returns:
        A matplotlib ``Normalize`` with explicit limits, to share between images.
    """
    from matplotlib.colors import LogNorm, Normalize, SymLogNorm

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if (symmetric or (lo < 0 < hi)) and (lo < 0 or hi > 0):
        m = max(-lo, hi)
        if spans_decades(v, decades):
            nonzero = np.abs(v[v != 0])
            linthresh = max(float(np.quantile(nonzero, 0.1)), m * 1e-6)
            return SymLogNorm(linthresh=linthresh, vmin=-m, vmax=m, base=10)
        return Normalize(-m, m)
    if lo > 0 and spans_decades(v, decades):
        return LogNorm(lo, hi)
    return Normalize(lo, hi if hi > lo else lo + 1.0)


def axis_scale(values: Any, decades: float = DECADES) -> str:
    """``"log"`` for positive values spanning decades, ``"symlog"`` for signed ones, else linear.

    Args:
        values: The data of one axis.
        decades: See :func:`spans_decades`.

    Returns:
        A name for ``Axes.set_xscale`` / ``set_yscale``.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not spans_decades(v, decades):
        return "linear"
    return "log" if v.min() > 0 else "symlog"


def set_scale(ax: Axes, axis: str, values: Any, decades: float = DECADES) -> str:
    """Give ``ax``'s ``axis`` (``"x"``/``"y"``) the :func:`axis_scale` of ``values``.

    A symmetric-log axis is linear below the 10th percentile of the non-zero magnitudes.

    Args:
        ax: The axes.
        axis: ``"x"`` or ``"y"``.
        values: Everything drawn along that axis.
        decades: See :func:`spans_decades`.

    Returns:
        The scale set.
    """
    scale = axis_scale(values, decades)
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    if scale == "symlog":
        v = np.abs(np.asarray(values, dtype=np.float64))
        v = v[np.isfinite(v) & (v > 0)]
        setter(scale, linthresh=float(np.quantile(v, 0.1)))
    else:
        setter(scale)
    return scale


def labelled_colorbar(fig: Figure, mappable: ScalarMappable, ax: Axes, label: str) -> Colorbar:
    """A colour bar beside ``ax`` that says what its colours show.

    Args:
        fig: The figure.
        mappable: The image or contour set.
        ax: The axes to attach it to.
        label: What the colours mean, with units or scale.

    Returns:
        The colour bar.
    """
    if not label:
        raise ValueError("Expected a non-empty colour bar `label`: say what the colours show.")
    return fig.colorbar(mappable, ax=ax, label=label)


def legend_outside(ax: Axes, *, title: str | None = None, fontsize: float = LABEL_SIZE) -> None:
    """A legend to the right of ``ax`` (outside the data), in columns of at most 20 entries.

    Args:
        ax: Axes whose labelled artists the legend lists.
        title: Legend title.
        fontsize: Font size of the entries.
    """
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    ax.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        fontsize=fontsize,
        title=title,
        title_fontsize=fontsize,
        ncols=max(1, -(-len(handles) // 20)),
        frameon=False,
    )


def layer_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours, one per layer, in depth order.

    ``tab10`` up to 10 layers, ``tab20`` (dark and light pairs reordered so neighbours differ)
    up to 20, beyond that evenly spaced samples of ``turbo``; pair with :func:`layer_markers`
    for a second cue.

    Args:
        n: Number of layers.

    Returns:
        RGBA tuples.
    """
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        order = [*range(0, 20, 2), *range(1, 20, 2)]  # the ten dark colours first
        return [cmap(order[i]) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def masked_cmap(name: str) -> Colormap:
    """The colour map ``name`` with masked (NaN, undefined) cells light grey."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="0.85")


def layer_markers(n: int) -> list[str]:
    """A marker per layer, cycling :data:`MARKERS` (a second cue besides colour)."""
    return [MARKERS[i % len(MARKERS)] for i in range(n)]


def name_ticks(ax: Axes, axis: str, names: Sequence[str], *, rotation: float = 0.0) -> None:
    """Label ticks ``0..len(names)-1`` of ``axis`` (``"x"``/``"y"``) with layer names.

    Args:
        ax: The axes.
        axis: ``"x"`` or ``"y"``.
        names: One label per tick.
        rotation: Rotation of x labels (right-aligned when rotated).
    """
    ticks = range(len(names))
    if axis == "x":
        ha = "right" if rotation else "center"
        ax.set_xticks(ticks, list(names), rotation=rotation, ha=ha, fontsize=LABEL_SIZE)
    else:
        ax.set_yticks(ticks, list(names), fontsize=LABEL_SIZE)


def wrap(text: str, width: int = 50) -> str:
    """``text`` broken into lines of about ``width`` characters, at spaces, dots or slashes.

    Example:
        >>> print(wrap("encoder.layers.11.self_attention.output_projection", 20))
        encoder.layers.11.
        self_attention.
        output_projection
    """
    pieces = re.findall(r"[^ ./]*[ ./]?", text)
    lines, line = [], ""
    for piece in (p for p in pieces if p):
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join([*lines, line.rstrip()])


def size_for_labels(base: float, count: int, per_label: float = 0.16) -> float:
    """A figure side long enough for ``count`` labels of :data:`LABEL_SIZE` (inches)."""
    return max(base, per_label * count + 1.5)
