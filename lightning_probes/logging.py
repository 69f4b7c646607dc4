"""Metric keys and TensorBoard artefacts (scalars, histograms, images, figures).

Keys follow ``probes/<probe>/<layer>/<quantity>`` (layer omitted for model-level values).
Rich artefacts go to every TensorBoard ``SummaryWriter`` among ``trainer.loggers`` (found by
duck typing: ``hasattr(logger.experiment, "add_histogram")``), on global rank zero only, at
``trainer.global_step``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor

from lightning_probes.core.cost import record_figure_seconds
from lightning_probes.core.device import to_floats

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def metric_key(probe: str, quantity: str, layer: str | None = None) -> str:
    """Build a metric key: ``probes/<probe>/<layer>/<quantity>`` (no layer: model level).

    Example:
        >>> metric_key("cka", "alignment", "net.0")
        'probes/cka/net.0/alignment'
        >>> metric_key("ablation", "auc")
        'probes/ablation/auc'
    """
    parts = ["probes", probe] + ([layer] if layer else []) + [quantity]
    return "/".join(parts)


def tensorboard_writers(trainer: Trainer) -> list[Any]:
    """Every TensorBoard-like ``SummaryWriter`` among ``trainer.loggers`` (duck-typed)."""
    writers = []
    for logger in trainer.loggers:
        try:
            experiment = getattr(logger, "experiment", None)
        except Exception:  # a logger that cannot build its writer is not ours to fix
            continue
        if hasattr(experiment, "add_histogram"):
            writers.append(experiment)
    return writers


def log_scalars(
    trainer: Trainer,
    pl_module: LightningModule,
    metrics: Mapping[str, float | Tensor],
    *,
    on_step: bool | None = True,
) -> None:
    """Send scalars to every logger at ``trainer.global_step`` and expose them for monitoring.

    Values are written to each logger directly (``logger.log_metrics(step=global_step)``)
    rather than only through ``LightningModule.log``: the latter flushes to the loggers only on
    steps that are multiples of ``Trainer(log_every_n_steps=...)``, which would silently drop a
    probe that runs on other steps. Every value is put in ``trainer.callback_metrics``. A key
    that a callback monitors (``EarlyStopping``, ``ModelCheckpoint``: any ``monitor=``) is
    registered with ``pl_module.log(..., logger=False)`` instead when the hook allows it
    (``on_step=True`` from ``on_train_batch_end``, ``False`` from ``on_train_epoch_end``), so
    that it is current in the epochs where the probe runs and absent, not stale, in the others.
    Only monitored keys go through ``pl_module.log``: Lightning processes every logged key
    again at each later step of the epoch, which costs real time for the dozens of per-layer
    scalars a probe logs.

    Non-finite values are logged as they are (a NaN is information, not an error).
    """
    clean = dict(zip(metrics, to_floats(list(metrics.values()))))  # one host synchronisation
    if not clean:
        return
    monitored = {getattr(cb, "monitor", None) for cb in trainer.callbacks}  # type: ignore[attr-defined]
    for key, value in clean.items():
        tensor = torch.tensor(value, dtype=torch.float32, device="cpu")
        if on_step is not None and key in monitored:
            try:
                pl_module.log(key, tensor, on_step=on_step, on_epoch=not on_step, logger=False)
                continue
            except Exception:  # hook where Lightning forbids self.log: fall through
                pass
        trainer.callback_metrics[key] = tensor
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=trainer.global_step)


def log_histogram(trainer: Trainer, key: str, values: Tensor) -> None:
    """Add a histogram of ``values`` (any shape, flattened, finite values only)."""
    writers = tensorboard_writers(trainer) if trainer.is_global_zero else []
    if not writers:  # nothing to write to: no copies of a possibly parameter-sized tensor
        return
    flat = values.detach().float().flatten().cpu()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return
    for writer in writers:
        writer.add_histogram(key, flat, global_step=trainer.global_step)


def log_image(trainer: Trainer, key: str, image: Tensor) -> None:
    """Add an image ``[C, H, W]`` (C in {1, 3}) or ``[H, W]``; values are min-max scaled."""
    if not trainer.is_global_zero:
        return
    img = image.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    img = to_unit_range(img)
    for writer in tensorboard_writers(trainer):
        writer.add_image(key, img, global_step=trainer.global_step, dataformats="CHW")


def log_figure(trainer: Trainer, key: str, figure: Figure) -> None:
    """Add a matplotlib figure (made with :func:`new_figure`) and close it."""
    if trainer.is_global_zero:
        writers = tensorboard_writers(trainer)
        for writer in writers:
            writer.add_figure(key, figure, global_step=trainer.global_step, close=False)
        created = getattr(figure, "_lightning_probes_created", None)
        if writers and created is not None:  # the cost of a figure, for budget predictions
            record_figure_seconds(time.perf_counter() - created)
    figure.clear()


def log_text(trainer: Trainer, key: str, text: str) -> None:
    """Add a text entry (markdown) to every TensorBoard writer."""
    if not trainer.is_global_zero:
        return
    for writer in tensorboard_writers(trainer):
        writer.add_text(key, text, global_step=trainer.global_step)


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
