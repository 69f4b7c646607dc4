"""Figures of :class:`~lightning_probes.callbacks.selectivity.SelectivityCallback`.

Morcos et al. (ICLR 2018), Fig. 5: is a unit's class selectivity a predictor of how much the
loss grows when it is ablated? One scatter of the two per layer, with Spearman's r.
"""

from __future__ import annotations

from collections.abc import Mapping

from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.functional.selectivity import spearman_correlation


def log_importance_scatter(
    trainer: Trainer, selectivity: Mapping[str, Tensor], impact: Mapping[str, Tensor]
) -> None:
    """Figure ``probes/selectivity/importance_scatter``: selectivity vs ablation impact.

    Args:
        trainer: Where the figure goes (TensorBoard writers, rank zero).
        selectivity: ``{layer: [u] selectivity index}``.
        impact: ``{layer: [u] loss increase when the unit is ablated}``.
    """
    fig = plog.new_figure(5, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for layer, si in selectivity.items():
        r = float(spearman_correlation(si, impact[layer]))
        label = f"{layer} (r={r:.2f})"
        ax.scatter(plog.as_numpy(si), plog.as_numpy(impact[layer]), s=8, label=label)
    ax.set(xlabel="class selectivity", ylabel="loss increase when ablated")
    ax.legend(fontsize=7)
    plog.log_figure(trainer, "probes/selectivity/importance_scatter", fig)
