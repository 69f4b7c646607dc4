"""Figures and images of :class:`~lightning_probes.callbacks.landscape.LandscapeCallback`.

Drawn on a bare matplotlib ``Figure`` (:func:`lightning_probes.logging.new_figure`), never
through pyplot: the loss plane as a log-loss image and a contour figure (Li et al. 2018;
Fort & Jastrzebski 2019's radial tunnel), and the loss along segments to earlier checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import (
    LABEL_SIZE,
    SEQUENTIAL,
    color_norm,
    labelled_colorbar,
    layer_colors,
    legend_outside,
    set_scale,
    styled_figure,
)
from lightning_probes.core.landscape.planes import LossPlane

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def plane_image(plane: LossPlane) -> Tensor:
    """``[B, A]`` log-loss of a plane, rows flipped so that ``b`` increases upwards.

    Log scale: the loss spans orders of magnitude across a plane; flipped as on the contour.
    """
    return plane.losses.clamp_min(1e-12).log().flip(0)


def log_plane(
    trainer: Trainer,
    key: Callable[..., str],
    kind: str,
    plane: LossPlane,
    *,
    figures: bool,
) -> None:
    """Log a plane as an image (``plane_<kind>``) and, with ``figures``, a contour figure.

    Args:
        trainer: Where the artefacts go (TensorBoard writers, rank zero).
        key: ``(quantity, layer=None) -> metric key``.
        kind: ``"radial"`` (``u = θ``: ``a = -1`` is the origin) or ``"random"``.
        plane: The loss on the grid.
        figures: Draw the contour figure (matplotlib present).
    """
    plog.log_image(trainer, key(f"plane_{kind}"), plane_image(plane))
    if not figures:
        return
    plog.log_figure(
        trainer, key(f"plane_{kind}_contour"), plane_figure(plane, kind, trainer.global_step)
    )


def plane_figure(plane: LossPlane, kind: str, step: int) -> Figure:
    """Filled contours of the loss on a plane, on a log colour scale where it spans decades.

    Args:
        plane: The loss on the grid (non-finite losses are left blank).
        kind: ``"radial"`` or ``"random"`` (see :func:`log_plane`).
        step: The global step.

    Returns:
        The figure, with a labelled colour bar and the current weights (and origin) marked.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import (
        LogFormatterSciNotation,
        LogLocator,
        NullLocator,
        StrMethodFormatter,
    )

    fig = styled_figure(5.6, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    a, b, z = (plog.as_numpy(x) for x in (plane.alphas, plane.betas, plane.losses))
    z = np.ma.masked_invalid(z)
    norm = color_norm(z.compressed())
    if isinstance(norm, LogNorm):  # levels evenly spaced in log: each colour is a ratio
        levels = np.geomspace(float(norm.vmin), float(norm.vmax), 21)  # type: ignore[arg-type]
        filled = ax.contourf(a, b, z, levels=levels, norm=norm, cmap=SEQUENTIAL)
        label = "probe-set loss (log scale)"
    else:
        filled = ax.contourf(a, b, z, levels=20, cmap=SEQUENTIAL)
        label = "probe-set loss"
    bar = labelled_colorbar(fig, filled, ax, label)
    if isinstance(norm, LogNorm):  # ticks at powers of ten, not at the contour levels
        few = np.log10(float(norm.vmax) / float(norm.vmin)) < 3  # type: ignore[arg-type]
        bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if few else (1.0,)))
        bar.ax.yaxis.set_major_formatter(
            StrMethodFormatter("{x:g}") if few else LogFormatterSciNotation()
        )
        bar.ax.yaxis.set_minor_locator(NullLocator())
    ax.plot([0.0], [0.0], "r*", markersize=10, label="current weights")
    if kind == "radial" and a[0] <= -1.0:
        ax.plot([-1.0], [0.0], "wo", markeredgecolor="black", label="origin (θ = 0)")
    ax.set_xlabel("a  (along θ)" if kind == "radial" else "a  (random direction u)")
    ax.set_ylabel("b  (random direction ⊥ θ)" if kind == "radial" else "b  (random direction v)")
    ax.set_title(f"step {step}: {kind} plane", fontsize="medium")
    ax.legend(fontsize=LABEL_SIZE, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2)
    return fig


def log_segments(
    trainer: Trainer, key: Callable[..., str], curves: Sequence[tuple[int, Tensor, Tensor]]
) -> None:
    """Figure ``segments``: the loss along each segment from a kept checkpoint to now.

    Args:
        trainer: Where the figure goes.
        key: ``(quantity, layer=None) -> metric key``.
        curves: ``(step of the checkpoint, t [m], losses [m])`` per segment.
    """
    fig = styled_figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    colors = layer_colors(len(curves))
    values = []
    for (step, t, losses), color in zip(curves, colors, strict=True):
        values.append(plog.as_numpy(losses))
        ax.plot(plog.as_numpy(t), values[-1], marker=".", color=color, label=f"from step {step}")
    if values:
        set_scale(ax, "y", np.concatenate(values))
    ax.set_xlabel("t  (0: earlier checkpoint, 1: now)")
    ax.set_ylabel("probe-set loss")
    ax.set_title(
        f"step {trainer.global_step}: straight segments to kept checkpoints", fontsize="medium"
    )
    legend_outside(ax)
    plog.log_figure(trainer, key("segments"), fig)
