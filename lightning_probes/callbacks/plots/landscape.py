"""Figures and images of :class:`~lightning_probes.callbacks.landscape.LandscapeCallback`.

Drawn on a bare matplotlib ``Figure`` (:func:`lightning_probes.logging.new_figure`), never
through pyplot: the loss plane as a log-loss image and a contour figure (Li et al. 2018;
Fort & Jastrzebski 2019's radial tunnel), and the loss along segments to earlier checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.core.landscape.planes import LossPlane


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
    fig = plog.new_figure(4.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    a, b, z = (plog.as_numpy(x) for x in (plane.alphas, plane.betas, plane.losses))
    filled = ax.contourf(a, b, z, levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="probe-set loss")
    ax.plot([0.0], [0.0], "r*", markersize=10, label="current weights")
    if kind == "radial" and a[0] <= -1.0:
        ax.plot([-1.0], [0.0], "wo", label="origin")
    ax.set_xlabel("a  (along θ)" if kind == "radial" else "a  (random direction u)")
    ax.set_ylabel("b  (random direction ⊥ θ)" if kind == "radial" else "b  (random v)")
    ax.set_title(f"step {trainer.global_step}: {kind} plane")
    ax.legend(fontsize="small", loc="upper right")
    plog.log_figure(trainer, key(f"plane_{kind}_contour"), fig)


def log_segments(
    trainer: Trainer, key: Callable[..., str], curves: Sequence[tuple[int, Tensor, Tensor]]
) -> None:
    """Figure ``segments``: the loss along each segment from a kept checkpoint to now.

    Args:
        trainer: Where the figure goes.
        key: ``(quantity, layer=None) -> metric key``.
        curves: ``(step of the checkpoint, t [m], losses [m])`` per segment.
    """
    fig = plog.new_figure(5.0, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for step, t, losses in curves:
        ax.plot(plog.as_numpy(t), plog.as_numpy(losses), marker=".", label=f"from step {step}")
    ax.set_xlabel("t  (0: earlier checkpoint, 1: now)")
    ax.set_ylabel("probe-set loss")
    ax.legend(fontsize="small")
    plog.log_figure(trainer, key("segments"), fig)
