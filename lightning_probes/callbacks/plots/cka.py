"""Figures and images of :class:`~lightning_probes.callbacks.cka.LayerCKACallback`.

Lou et al. (ICML 2022), Figs. 1-2: the alignment of each layer's tangent kernel with the labels
against depth (this run) and as a layer x step heatmap (the "alignment hierarchy"); and the
centred kernel itself as an image, samples sorted by class so that alignment shows as blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pytorch_lightning import Trainer
from torch import Tensor
from torch.nn import functional as F

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import (
    DIVERGING,
    SEQUENTIAL,
    color_norm,
    labelled_colorbar,
    masked_cmap,
    name_ticks,
    set_scale,
    size_for_labels,
    styled_figure,
    wrap,
)
from lightning_probes.functional.alignment import center_kernel

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def kernel_image(
    kernel: Tensor, targets: Tensor, centering: Literal["samples", "full"], size: int = 256
) -> Tensor:
    """The centred kernel as an image, at most ``size x size`` pixels (average-pooled).

    Args:
        kernel: ``[n*o, n*o]`` kernel, row index ``i*o + c``.
        targets: ``[n]`` class labels (samples are sorted by class) or ``[n, ...]``.
        centering: ``"samples"`` or ``"full"`` (see
            :func:`~lightning_probes.functional.alignment.center_kernel`).
        size: Largest side of the image.

    Returns:
        ``[min(n*o, size), min(n*o, size)]`` float32.
    """
    n = targets.shape[0]
    o = kernel.shape[0] // n
    kc = center_kernel(kernel.double(), o, centering).view(n, o, n, o)
    if targets.ndim == 1:  # samples sorted by class show the block structure of alignment
        order = torch.argsort(targets.to(kc.device), stable=True)
        kc = kc[order][:, :, order]
    img = kc.reshape(1, 1, n * o, n * o).float()
    if n * o > size:
        img = F.adaptive_avg_pool2d(img, size)
    return img[0, 0]


def log_kernel(
    trainer: Trainer,
    key: str,
    kernel: Tensor,
    targets: Tensor,
    centering: Literal["samples", "full"],
    *,
    figure: bool,
) -> None:
    """Log a layer's centred kernel under ``key``: a figure with a colour bar, or an image.

    Args:
        trainer: Where it goes (rank zero).
        key: The metric key (``probes/cka/<layer>/kernel``).
        kernel: ``[n*o, n*o]`` kernel, row index ``i*o + c``.
        targets: ``[n]`` class labels or ``[n, ...]`` targets.
        centering: See :func:`kernel_image`.
        figure: Draw a figure (matplotlib present); else the bare image (min-max scaled).
    """
    image = kernel_image(kernel, targets, centering)
    if not figure:
        plog.log_image(trainer, key, image)
        return
    labels = targets if targets.ndim == 1 else None
    title = f"centred kernel of {'/'.join(key.split('/')[2:-1]) or 'the model'}"
    pooled = image.shape[0] < kernel.shape[0]
    figure_ = kernel_figure(image, title, labels, trainer.global_step, pooled=pooled)
    plog.log_figure(trainer, key, figure_)


def kernel_figure(
    image: Tensor, title: str, labels: Tensor | None, step: int, *, pooled: bool = False
) -> Figure:
    """The centred kernel on a symmetric diverging scale, class blocks outlined.

    Args:
        image: ``[m, m]`` from :func:`kernel_image`.
        title: What the kernel is (long layer names are wrapped).
        labels: ``[n]`` class labels of the samples (sorted by class in the image: the class
            boundaries are drawn), or ``None``.
        step: The global step.
        pooled: The image is average-pooled (said on the colour bar).

    Returns:
        The figure.
    """
    img = plog.as_numpy(image)
    fig = styled_figure(5.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    shown = ax.imshow(
        img, cmap=DIVERGING, norm=color_norm(img, symmetric=True), interpolation="nearest"
    )
    label = "centred tangent kernel $K_c[i, j]$" + (" (block means)" if pooled else "")
    labelled_colorbar(fig, shown, ax, label)
    if labels is not None:
        counts = torch.unique(labels.cpu(), return_counts=True)[1]
        for edge in (torch.cumsum(counts, 0)[:-1] * img.shape[0] / labels.numel()).tolist():
            ax.axhline(edge - 0.5, color="black", lw=0.5)
            ax.axvline(edge - 0.5, color="black", lw=0.5)
    ax.set(xlabel="sample x output (sorted by class)", ylabel="sample x output (sorted by class)")
    ax.set_title(wrap(f"step {step}: {title}", 55), fontsize="small")
    return fig


def log_alignment_figures(
    trainer: Trainer,
    key: Callable[..., str],
    steps: Sequence[int],
    history: np.ndarray,
    names: Sequence[str],
) -> None:
    """Figures ``alignment_vs_layer`` (last run) and ``alignment_hierarchy`` (all runs).

    Args:
        trainer: Where the figures go (TensorBoard writers, rank zero).
        key: ``(quantity, layer=None) -> metric key``.
        steps: The step of every run so far.
        history: ``[runs, layers]`` alignments (NaN where undefined).
        names: The layers' names, in model order.
    """
    plog.log_figure(
        trainer, key("alignment_vs_layer"), alignment_vs_layer_figure(steps, history, names)
    )
    plog.log_figure(
        trainer, key("alignment_hierarchy"), alignment_hierarchy_figure(steps, history, names)
    )


def alignment_vs_layer_figure(
    steps: Sequence[int], history: np.ndarray, names: Sequence[str]
) -> Figure:
    """The last run's kernel-label alignment against depth (log axis where it spans decades)."""
    fig = styled_figure(size_for_labels(6.0, len(names), 0.3), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(len(names)), history[-1], marker="o")
    name_ticks(ax, "x", names, rotation=45)
    set_scale(ax, "y", history[-1])
    ax.set(xlabel="layer", ylabel="kernel-label alignment $A_l$", title=f"step {steps[-1]}")
    return fig


def alignment_hierarchy_figure(
    steps: Sequence[int], history: np.ndarray, names: Sequence[str]
) -> Figure:
    """Alignment per layer (rows, model order) and run (columns), with a labelled colour bar."""
    fig = styled_figure(6.5, size_for_labels(3.8, len(names)))
    ax = fig.add_subplot(1, 1, 1)
    values = np.ma.masked_invalid(np.asarray(history, dtype=np.float64).T)
    cmap = masked_cmap(SEQUENTIAL)
    image = ax.imshow(
        values, aspect="auto", origin="lower", interpolation="nearest", cmap=cmap,
        norm=color_norm(values.compressed()),
    )  # fmt: skip
    name_ticks(ax, "y", names)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    title = "alignment hierarchy" + (" (grey: undefined)" if values.mask.any() else "")
    ax.set(xlabel="step", ylabel="layer", title=title)
    labelled_colorbar(fig, image, ax, "kernel-label alignment $A_l$")
    return fig
