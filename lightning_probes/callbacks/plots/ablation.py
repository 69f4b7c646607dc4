"""Figures of :class:`~lightning_probes.callbacks.ablation.AblationAUCCallback`.

Morcos et al. (ICLR 2018), Figs. 2-3: accuracy on the training probe set as random units are
ablated cumulatively (mean ± std over orderings), and as Gaussian noise of growing scale is
added to every unit.
"""

from __future__ import annotations

from pytorch_lightning import Trainer

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import styled_figure
from lightning_probes.core.interventions.ablation import AblationCurve, NoiseCurve


def log_ablation_figures(trainer: Trainer, curve: AblationCurve, noise: NoiseCurve | None) -> None:
    """Figures ``probes/ablation/curve`` and, with ``noise``, ``probes/ablation/noise_curve``.

    Args:
        trainer: Where the figures go (TensorBoard writers, rank zero).
        curve: The cumulative ablation curve of this run.
        noise: The noise curve, or ``None``.
    """
    x, mean, std = (plog.as_numpy(t) for t in (curve.fractions, curve.mean, curve.std))
    orderings = int(curve.accuracy.shape[0]) if curve.accuracy.ndim == 2 else 1
    fig = styled_figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(x, mean, color="C0", label="mean")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.25, label="± std")
    ax.set(xlabel="fraction of units ablated", ylabel="accuracy (probe set)", ylim=(0, 1.02))
    ax.set_title(
        f"step {trainer.global_step}: units ablated cumulatively\n"
        f"(each point adds to the previous ones; {orderings} random orders), "
        f"AUC {float(curve.auc):.3f}",
        fontsize="medium",
    )
    plog.log_figure(trainer, "probes/ablation/curve", fig)
    if noise is not None:
        fig = styled_figure(5.5, 3.8)
        ax = fig.add_subplot(1, 1, 1)
        s, m, sd = (plog.as_numpy(t) for t in (noise.scales, noise.mean, noise.std))
        ax.errorbar(s, m, yerr=sd, marker="o")
        ax.set(xscale="log", xlabel="noise std / unit std", ylabel="accuracy (probe set)")
        ax.set(ylim=(0, 1.02))
        ax.set_title(
            f"step {trainer.global_step}: Gaussian noise on every unit (mean ± std)",
            fontsize="medium",
        )
        plog.log_figure(trainer, "probes/ablation/noise_curve", fig)
