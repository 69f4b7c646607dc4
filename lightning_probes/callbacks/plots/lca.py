"""Artefacts of :class:`~lightning_probes.callbacks.lca.LossContributionCallback`.

Drawn on a bare matplotlib ``Figure`` (:func:`lightning_probes.logging.new_figure`), never
through pyplot. Lan et al. (NeurIPS 2019), Figs. 1 and 4: which layers helped (negative
cumulative LC) or hurt, and the loss curve rebuilt from the allocations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import (
    legend_outside,
    name_ticks,
    set_scale,
    size_for_labels,
    styled_figure,
)
from lightning_probes.functional.lca import (
    fraction_helped,
    layer_sums,
    per_neuron_lc,
    rebuild_loss_curve,
    weibull_fit,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HELPED, HURT = "#2a9d8f", "#e76f51"
ROOT_LAYER = "_root"
"""Layer name of parameters registered on the LightningModule itself."""


def log_artefacts(
    trainer: Trainer,
    key: Callable[..., str],
    lc: Mapping[str, Tensor],
    cumulative: Mapping[str, Tensor],
    layer_of: Mapping[str, str],
    history: Tensor,
    *,
    per_neuron: bool,
    figures: bool,
    seed: int,
) -> dict[str, float]:
    """Histograms and figures of one allocated step; returns the scalars to log with them.

    Args:
        trainer: Where histograms and figures go (TensorBoard writers, rank zero).
        key: ``(quantity, layer=None) -> metric key``.
        lc: The step's per-parameter LC.
        cumulative: Per-parameter cumulative LC.
        layer_of: ``{parameter name: layer name}``.
        history: The callback's ``history`` rows, for the rebuilt loss curve.
        per_neuron: Add per-neuron sums of the cumulative LC (histogram + fraction helped).
        figures: Draw the figures (matplotlib present and a TensorBoard writer to take them).
        seed: Seed of the Weibull fit's subsample.

    Returns:
        ``weibull_shape``/``weibull_scale`` of the step's :math:`|LC|` (with scipy) and, with
        ``per_neuron``, ``<layer>/neuron_fraction_helped``.
    """
    metrics: dict[str, float] = {}
    if trainer.is_global_zero and plog.artefact_sinks(trainer, "histogram"):
        # one layer's values at a time: the only temporaries are that layer's
        by_layer: dict[str, list[Tensor]] = {}
        for name, value in lc.items():
            by_layer.setdefault(layer_of.get(name, ROOT_LAYER), []).append(value)
        for layer, values in by_layer.items():
            flat = values[0] if len(values) == 1 else torch.cat([v.flatten() for v in values])
            plog.log_histogram(trainer, key("lc", layer), flat)
    if per_neuron:
        for layer in dict.fromkeys(layer_of.values()):
            weight = cumulative.get(f"{layer}.weight")
            if weight is None or weight.ndim < 2:
                continue
            neurons = per_neuron_lc(weight, cumulative.get(f"{layer}.bias"))
            plog.log_histogram(trainer, key("neuron_cumulative_lc", layer), neurons)
            metrics[key("neuron_fraction_helped", layer)] = fraction_helped(neurons)
    if lc and _scipy_available():
        shape, scale = weibull_fit(list(lc.values()), seed=seed)  # no concatenated copy
        if shape == shape:  # not NaN
            metrics[key("weibull_shape")] = shape
            metrics[key("weibull_scale")] = scale
    if figures:
        per_layer = layer_sums(cumulative, layer_of)
        steps = plog.as_numpy(history[:, 0]).astype(int).tolist() if history.numel() else []
        figure = cumulative_by_layer_figure(per_layer, steps=steps)
        plog.log_figure(trainer, key("cumulative_by_layer"), figure)
        plog.log_figure(trainer, key("loss_curve"), loss_curve_figure(history))
    return metrics


def cumulative_by_layer_figure(
    cumulative: Mapping[str, float], *, steps: Sequence[int] | None = None
) -> Figure:
    """Horizontal bars of the cumulative LC of every layer (negative: the layer helped).

    Args:
        cumulative: ``{layer: Σ over instrumented steps and parameters of LC}``.
        steps: The allocated (instrumented) steps the sum covers, for the title; ``None``:
            not stated.

    Returns:
        A figure with one bar per layer, in model order.
    """
    names = list(cumulative)
    values = np.array([cumulative[n] for n in names], dtype=np.float64)
    fig = styled_figure(6.5, size_for_labels(2.5, len(names), 0.25))
    ax = fig.add_subplot()
    ax.barh(np.arange(len(names)), values, color=[HELPED if v < 0 else HURT for v in values])
    name_ticks(ax, "y", names)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel("cumulative loss contribution (negative = helped)")
    ax.set_ylabel("layer")
    # over the whole figure: long layer names leave the axes too narrow for it
    fig.suptitle(f"LCA per layer: {_covered(steps)}", fontsize="medium")
    return fig


def _covered(steps: Sequence[int] | None) -> str:
    """What a cumulative sum covers, in words."""
    if steps is None:
        return "sum over the instrumented steps"
    if not steps:
        return "no step allocated yet"
    first, last = min(steps), max(steps)
    n = len(steps)
    return f"sum over {n} instrumented step{'s' if n > 1 else ''}, steps {first}–{last}"


def loss_curve_figure(history: torch.Tensor) -> Figure:
    r"""The loss curve rebuilt from LC, :math:`L_0 + \sum_t \sum_i LC_{i,t}`, vs the measured one.

    Each run of consecutive instrumented steps starts from the loss measured before its first
    step; gaps (steps not instrumented) start a new segment.

    Args:
        history: ``[m, ≥4]`` rows ``(step, L(θ_t), L(θ_{t+1}), Σ LC)`` in step order.

    Returns:
        A figure with the measured loss (dots) and the rebuilt loss (lines) per segment.
    """
    h = plog.as_numpy(history)
    fig = styled_figure(6.0, 4.0)
    ax = fig.add_subplot()
    shown = []
    for i, seg in enumerate(_segments(h[:, 0])):
        steps = np.concatenate([[h[seg[0], 0] - 1], h[seg, 0]])
        rebuilt = plog.as_numpy(rebuild_loss_curve(float(h[seg[0], 1]), _tensor(h[seg, 3])))
        measured = np.concatenate([[h[seg[0], 1]], h[seg, 2]])
        shown += [measured, rebuilt]  # the axis must show both (rebuilt may be < 0)
        ax.plot(steps, measured, "o", ms=3, color="black", label="measured" if i == 0 else None)
        ax.plot(steps, rebuilt, "-", color=HURT, label="rebuilt from LC" if i == 0 else None)
    if shown:
        set_scale(ax, "y", np.concatenate(shown))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss on the LCA set")
    ax.set_title("measured loss vs loss rebuilt from LC", fontsize="medium")
    legend_outside(ax)
    return fig


def _segments(steps: np.ndarray) -> list[np.ndarray]:
    """Indices of runs of consecutive steps."""
    if steps.size == 0:
        return []
    breaks = np.nonzero(np.diff(steps) != 1)[0] + 1
    return np.split(np.arange(steps.size), breaks)


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _scipy_available() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return False
    return True
