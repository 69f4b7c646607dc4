"""Metric keys, and scalars, histograms, images, figures and text for every logger.

Keys follow ``probes/<probe>/<layer>/<quantity>``. Scalars go to every logger of the Trainer;
histograms, images, figures and text go to every logger that has a form for them:
TensorBoard, W&B, MLflow and CSV (a folder of PNG files), as
:mod:`lightning_probes.logging.sinks` lists. Figures are matplotlib figures made without
``pyplot`` (:func:`new_figure`), rendered once for all loggers.
"""

from lightning_probes.logging.artefacts import (
    log_figure,
    log_histogram,
    log_image,
    log_scalars,
    log_text,
    metric_key,
)
from lightning_probes.logging.figures import (
    as_numpy,
    image_grid,
    image_pixels,
    matplotlib_available,
    new_figure,
    render_figure,
    to_unit_range,
)
from lightning_probes.logging.sinks import (
    TAKERS,
    ArtefactSink,
    artefact_sinks,
    path_safe_key,
    sink_for,
    tensorboard_writers,
)

__all__ = [
    "TAKERS",
    "ArtefactSink",
    "artefact_sinks",
    "as_numpy",
    "image_grid",
    "image_pixels",
    "log_figure",
    "log_histogram",
    "log_image",
    "log_scalars",
    "log_text",
    "matplotlib_available",
    "metric_key",
    "new_figure",
    "path_safe_key",
    "render_figure",
    "sink_for",
    "tensorboard_writers",
    "to_unit_range",
]
