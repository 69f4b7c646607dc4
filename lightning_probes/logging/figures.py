"""Figures and images as pixels: matplotlib figures without ``pyplot``, tensors as images.

Every logger receives the same pixels: a figure is rendered once (:func:`render_figure`) and
an image tensor is scaled to ``uint8`` once (:func:`image_pixels`), whatever the number of
loggers.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def matplotlib_available() -> bool:
    """Whether figures can be drawn (matplotlib is an optional dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A matplotlib ``Figure`` on an Agg canvas, made without ``pyplot``.

    Using ``Figure`` directly never touches the user's pyplot state or GUI backend, and the
    figure is garbage-collected when dropped (no global figure registry).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig._lightning_probes_created = time.perf_counter()  # type: ignore[attr-defined]
    return fig


def render_figure(figure: Figure) -> np.ndarray:
    """Draw ``figure`` on an Agg canvas and return its pixels, ``uint8`` of shape ``[H, W, 3]``.

    What TensorBoard's ``add_figure`` does, once for every logger; a figure on another canvas
    (pyplot's, a GUI backend's) is given an Agg canvas, without ``pyplot``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def image_pixels(image: Tensor) -> np.ndarray:
    """An image ``[C, H, W]`` (C in {1, 3}) or ``[H, W]`` as ``uint8`` pixels, min-max scaled.

    Returns:
        ``[H, W]`` for one channel, ``[H, W, 3]`` for three (the layout PIL, W&B and MLflow
        take).

    Raises:
        ValueError: If ``image`` has another shape.
    """
    img = image.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(
            f"Expected an image of shape [C, H, W] (C 1 or 3) or [H, W], got {tuple(image.shape)}."
        )
    pixels = (to_unit_range(img) * 255.0).round().to(torch.uint8).numpy()
    return pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))


def to_unit_range(x: Tensor) -> Tensor:
    """Min-max scale ``x`` to [0, 1] (a constant tensor maps to 0.5)."""
    lo, hi = x.min(), x.max()
    if not math.isfinite(float(hi - lo)) or float(hi - lo) == 0.0:
        return torch.full_like(x, 0.5)
    return (x - lo) / (hi - lo)


def image_grid(images: Tensor, ncol: int | None = None, pad: int = 1) -> Tensor:
    """Tile ``[k, C, H, W]`` images (each min-max scaled on its own) into one ``[C, H', W']``."""
    k, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(k))
    nrow = math.ceil(k / ncol)
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad, device="cpu")
    for idx in range(k):
        r, col = divmod(idx, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = to_unit_range(images[idx].float().cpu())
    return grid


def as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """Detach, move to CPU and convert to a float64 NumPy array (for plotting)."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)
