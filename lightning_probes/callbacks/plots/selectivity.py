"""Figures of :class:`~lightning_probes.callbacks.selectivity.SelectivityCallback`.

Morcos et al. (ICLR 2018), Fig. 5: is a unit's class selectivity a predictor of how much the
loss grows when it is ablated? One scatter of the two per layer, with Spearman's r.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import (
    layer_colors,
    layer_markers,
    legend_outside,
    set_scale,
    size_for_labels,
    styled_figure,
)
from lightning_probes.functional.selectivity import spearman_correlation

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_importance_scatter(
    trainer: Trainer, selectivity: Mapping[str, Tensor], impact: Mapping[str, Tensor]
) -> None:
    """Figure ``probes/selectivity/importance_scatter``: selectivity vs ablation impact.

    Args:
        trainer: Where the figure goes (TensorBoard writers, rank zero).
        selectivity: ``{layer: [u] selectivity index}``.
        impact: ``{layer: [u] loss increase when the unit is ablated}``.
    """
    figure = importance_scatter_figure(selectivity, impact, trainer.global_step)
    plog.log_figure(trainer, "probes/selectivity/importance_scatter", figure)


def importance_scatter_figure(
    selectivity: Mapping[str, Tensor], impact: Mapping[str, Tensor], step: int
) -> Figure:
    """Selectivity vs ablation impact, one colour and marker per layer, legend beside the data.

    The impact axis turns symmetric-log where the impacts span decades.

    Args:
        selectivity: ``{layer: [u] selectivity index}``.
        impact: ``{layer: [u] loss increase when the unit is ablated}``.
        step: The global step.

    Returns:
        The figure.
    """
    layers = list(selectivity)
    fig = styled_figure(8.0, size_for_labels(4.0, len(layers), 0.2))
    ax = fig.add_subplot(1, 1, 1)
    colors, markers = layer_colors(len(layers)), layer_markers(len(layers))
    for layer, color, marker in zip(layers, colors, markers, strict=True):
        si, imp = selectivity[layer], impact[layer]
        r = float(spearman_correlation(si, imp))
        ax.scatter(
            plog.as_numpy(si), plog.as_numpy(imp), s=10, color=color, marker=marker,
            alpha=0.8, linewidths=0, label=f"{layer} (r={r:.2f})",
        )  # fmt: skip
    if layers:
        set_scale(ax, "y", np.concatenate([plog.as_numpy(impact[layer]) for layer in layers]))
    ax.set(xlabel="class selectivity", ylabel="loss increase when ablated")
    ax.set_title(f"step {step}: selectivity vs importance (Spearman r)", fontsize="medium")
    legend_outside(ax, title="layer")
    return fig
