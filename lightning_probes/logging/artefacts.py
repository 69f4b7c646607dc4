"""Metric keys, and what a probe logs: scalars, histograms, images, figures, text.

Keys follow ``probes/<probe>/<layer>/<quantity>`` (layer omitted for model-level values).
Scalars go to every logger of the Trainer. Histograms, images, figures and text go to every
logger that has a form for them (:mod:`lightning_probes.logging.sinks`: TensorBoard, W&B,
MLflow, CSV), on global rank zero only, at ``trainer.global_step``. A logger that fails is
warned about once and skipped; training and the other loggers go on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor

from lightning_probes.core.cost import record_figure_seconds
from lightning_probes.core.device import to_floats
from lightning_probes.logging.figures import image_pixels, render_figure
from lightning_probes.logging.sinks import ArtefactSink, artefact_sinks, deliver

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
    (``on_step=True`` from ``on_train_batch_end``, ``False`` from ``on_train_epoch_end``) as
    well, and put in ``callback_metrics`` at once so that a monitor checking in the same hook
    (``EarlyStopping`` at epoch end) sees the new value; a monitored probe is never skipped by
    its budget (:func:`~lightning_probes.callbacks.budget.monitored_without_budget`).
    Only monitored keys go through ``pl_module.log``: Lightning processes every logged key
    again at each later step of the epoch, which costs real time for the dozens of per-layer
    scalars a probe logs. A logger that raises is warned about once and skipped.

    Non-finite values are logged as they are (a NaN is information, not an error).
    """
    clean = dict(zip(metrics, to_floats(list(metrics.values()))))  # one host synchronisation
    if not clean:
        return
    monitored = {getattr(cb, "monitor", None) for cb in trainer.callbacks}  # type: ignore[attr-defined]
    for key, value in clean.items():
        tensor = torch.tensor(value, dtype=torch.float32, device="cpu")
        if on_step is not None and key in monitored:
            with contextlib.suppress(Exception):  # a hook where Lightning forbids self.log
                pl_module.log(key, tensor, on_step=on_step, on_epoch=not on_step, logger=False)
        # at once, so a monitor checking in this same hook (EarlyStopping at epoch end) sees it
        trainer.callback_metrics[key] = tensor
    if trainer.is_global_zero:
        step, keys = trainer.global_step, ", ".join(list(clean)[:2])
        keys += ", ..." if len(clean) > 2 else ""
        for logger in trainer.loggers:
            sink = ArtefactSink(logger)
            send = lambda lg=logger: lg.log_metrics(clean, step=step)  # noqa: E731
            deliver(sink, "scalars", keys, step, send)


def log_histogram(trainer: Trainer, key: str, values: Tensor) -> None:
    """Log a histogram of ``values`` (any shape, flattened, finite values only).

    Goes to TensorBoard (``add_histogram``) and W&B (``wandb.Histogram``); MLflow and CSV
    loggers have no form for it.
    """
    sinks = artefact_sinks(trainer, "histogram")
    if not sinks:  # nothing to write to: no copies of a possibly parameter-sized tensor
        return
    flat = values.detach().float().flatten().cpu()
    flat = flat[torch.isfinite(flat)]
    if flat.numel() == 0:
        return
    array, step = flat.numpy(), trainer.global_step
    for sink in sinks:
        deliver(sink, "histogram", key, step, lambda s=sink: s.histogram(key, array, step))


def log_image(trainer: Trainer, key: str, image: Tensor) -> None:
    """Log an image ``[C, H, W]`` (C in {1, 3}) or ``[H, W]``; values are min-max scaled."""
    sinks = artefact_sinks(trainer, "image")
    if not sinks:
        return
    pixels, step = image_pixels(image), trainer.global_step
    for sink in sinks:
        deliver(sink, "image", key, step, lambda s=sink: s.image(key, pixels, step))


def log_figure(trainer: Trainer, key: str, figure: Figure) -> None:
    """Log a matplotlib figure (made with :func:`new_figure`) as an image, and close it.

    The figure is rendered once, on an Agg canvas, and the same pixels go to every logger.
    """
    sinks = artefact_sinks(trainer, "image")
    if sinks:
        pixels, step = render_figure(figure), trainer.global_step
        for sink in sinks:
            deliver(sink, "figure", key, step, lambda s=sink: s.image(key, pixels, step))
        created = getattr(figure, "_lightning_probes_created", None)
        if created is not None:  # the cost of a figure, for budget predictions
            record_figure_seconds(time.perf_counter() - created)
    figure.clear()


def log_text(trainer: Trainer, key: str, text: str) -> None:
    """Log a short text entry (markdown) to every logger that takes text."""
    step = trainer.global_step
    for sink in artefact_sinks(trainer, "text"):
        deliver(sink, "text", key, step, lambda s=sink: s.text(key, text, step))
