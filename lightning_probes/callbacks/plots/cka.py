"""Figures and images of :class:`~lightning_probes.callbacks.cka.LayerCKACallback`.

Lou et al. (ICML 2022), Figs. 1-2: the alignment of each layer's tangent kernel with the labels
against depth (this run) and as a layer x step heatmap (the "alignment hierarchy"); and the
centred kernel itself as an image, samples sorted by class so that alignment shows as blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pytorch_lightning import Trainer
from torch import Tensor
from torch.nn import functional as F

from lightning_probes import logging as plog
from lightning_probes.functional.alignment import center_kernel


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
    fig = plog.new_figure(6.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(len(names)), history[-1], marker="o")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set(xlabel="layer", ylabel="alignment $A_l$", title=f"step {steps[-1]}")
    fig.tight_layout()
    plog.log_figure(trainer, key("alignment_vs_layer"), fig)
    fig = plog.new_figure(6.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(history.T, aspect="auto", origin="lower", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).astype(int))
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set(xlabel="step", ylabel="layer", title="alignment hierarchy")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    plog.log_figure(trainer, key("alignment_hierarchy"), fig)
