"""Where histograms, images, figures and text go: one adapter per kind of Lightning logger.

- ``TensorBoardLogger`` (any experiment with ``add_histogram``): ``add_histogram``,
  ``add_image`` (figures rendered as ``add_figure`` renders them), ``add_text``.
- ``WandbLogger``: ``wandb.Histogram``, ``wandb.Image``, a one-row ``wandb.Table`` for text.
- ``MLFlowLogger``: time-stepped ``log_image(key=, step=)``; text as ``<key>/step_<n>.txt``
  artefacts; no histograms (MLflow has no histogram type).
- ``CSVLogger``: ``<log_dir>/<key>/step_<n>.png`` and ``.txt`` files beside ``metrics.csv``;
  no histograms.
- Any other logger: scalars only.

Every artefact is logged at the step it is given (the probe's ``trainer.global_step``): W&B
through ``WandbLogger.log_metrics``, which records it against ``trainer/global_step`` as the
scalars are; MLflow as a time-stepped image (the step slider of its UI). Loggers are recognised
by class name (``lightning.pytorch`` and ``pytorch_lightning`` alike, subclasses too);
TensorBoard by duck typing, so any ``SummaryWriter``-like experiment takes artefacts.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pytorch_lightning.utilities import rank_zero_warn

Kind = Literal["histogram", "image", "text"]  # a figure is logged as the image it renders to

#: What each kind of logger takes beyond scalars, for messages and docs.
TAKERS: dict[str, tuple[str, ...]] = {
    "histogram": ("TensorBoardLogger", "WandbLogger"),
    "image": ("TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"),
    "text": ("TensorBoardLogger", "WandbLogger", "MLFlowLogger", "CSVLogger"),
}


class ArtefactSink:
    """One logger, seen as a place for histograms, images and text (rank zero only).

    Args:
        logger: The Lightning logger.
    """

    kinds: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    @property
    def name(self) -> str:
        """The logger's class name, for messages."""
        return type(self.logger).__name__

    def histogram(self, key: str, values: np.ndarray, step: int) -> None:
        """Log the distribution of ``values`` (``[n]`` float, finite, ``n >= 1``)."""
        raise NotImplementedError

    def image(self, key: str, pixels: np.ndarray, step: int) -> None:
        """Log ``uint8`` pixels, ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB)."""
        raise NotImplementedError

    def text(self, key: str, text: str, step: int) -> None:
        """Log a short text (markdown)."""
        raise NotImplementedError


class TensorBoardSink(ArtefactSink):
    """A TensorBoard ``SummaryWriter`` (or anything with its ``add_*`` methods)."""

    kinds = frozenset({"histogram", "image", "text"})

    def __init__(self, logger: Any, writer: Any) -> None:
        super().__init__(logger)
        self.writer = writer

    def histogram(self, key: str, values: np.ndarray, step: int) -> None:
        """``add_histogram``."""
        self.writer.add_histogram(key, values, global_step=step)

    def image(self, key: str, pixels: np.ndarray, step: int) -> None:
        """``add_image`` (a figure arrives rendered, as ``add_figure`` would render it)."""
        self.writer.add_image(key, pixels, global_step=step, dataformats=_layout(pixels))

    def text(self, key: str, text: str, step: int) -> None:
        """``add_text``."""
        self.writer.add_text(key, text, global_step=step)


class WandbSink(ArtefactSink):
    """A ``WandbLogger``: ``wandb.Histogram``, ``wandb.Image`` and ``wandb.Table`` values.

    They go through ``WandbLogger.log_metrics(..., step=step)``, which logs them with
    ``trainer/global_step = step`` (Lightning's step axis for W&B) and the logger's prefix,
    exactly as the scalars; W&B's own step counter is never set, so it never goes backwards.
    """

    kinds = frozenset({"histogram", "image", "text"})
    num_bins: ClassVar[int] = 64

    def histogram(self, key: str, values: np.ndarray, step: int) -> None:
        """A ``wandb.Histogram`` of 64 bins."""
        import wandb

        counts, edges = np.histogram(values, bins=self.num_bins)
        self.logger.log_metrics({key: wandb.Histogram(np_histogram=(counts, edges))}, step)

    def image(self, key: str, pixels: np.ndarray, step: int) -> None:
        """A ``wandb.Image``."""
        import wandb

        self.logger.log_metrics({key: wandb.Image(pixels)}, step)

    def text(self, key: str, text: str, step: int) -> None:
        """A one-row ``wandb.Table`` with columns ``step`` and ``text``."""
        import wandb

        table = wandb.Table(columns=["step", "text"], data=[[step, text]])
        self.logger.log_metrics({key: table}, step)


class MLflowSink(ArtefactSink):
    """An ``MLFlowLogger``: time-stepped images (``MlflowClient.log_image(key=, step=)``).

    MLflow stores them under the run's ``images/`` artefacts, named after the key and the
    step, and shows them with a step slider. Text goes to ``<key>/step_<n>.txt`` artefacts.
    MLflow has no histogram type: histograms are not logged to it.
    """

    kinds = frozenset({"image", "text"})

    def image(self, key: str, pixels: np.ndarray, step: int) -> None:
        """``log_image(run_id, pixels, key=key, step=step)``, the key made MLflow-safe."""
        safe = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", key)
        self.logger.experiment.log_image(self.logger.run_id, pixels, key=safe, step=step)

    def text(self, key: str, text: str, step: int) -> None:
        """``log_text`` to the artefact ``<key>/step_<n>.txt``."""
        path = f"{path_safe_key(key)}/step_{step}.txt"
        self.logger.experiment.log_text(self.logger.run_id, text, path)


class CSVSink(ArtefactSink):
    """A ``CSVLogger``: PNG files beside its ``metrics.csv``, ``<log_dir>/<key>/step_<n>.png``.

    Keys become folders (``probes/nad/directions`` -> ``probes/nad/directions/``), each part
    made path-safe (:func:`path_safe_key`). Text goes to ``step_<n>.txt`` files; histograms
    are not logged (a CSV file has no form for them).
    """

    kinds = frozenset({"image", "text"})

    def folder(self, key: str) -> Path:
        """The folder of ``key``'s files, created if needed."""
        folder = Path(self.logger.log_dir) / path_safe_key(key)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def image(self, key: str, pixels: np.ndarray, step: int) -> None:
        """Write ``step_<n>.png`` (Pillow, which matplotlib depends on)."""
        from PIL import Image

        Image.fromarray(pixels).save(self.folder(key) / f"step_{step}.png")

    def text(self, key: str, text: str, step: int) -> None:
        """Write ``step_<n>.txt``."""
        (self.folder(key) / f"step_{step}.txt").write_text(text, encoding="utf-8")


def path_safe_key(key: str) -> str:
    """``key`` as a relative path: each ``/``-separated part keeps ``[A-Za-z0-9._-]`` only.

    Other characters become ``_``, and empty, ``.`` or ``..`` parts become ``_``, so a key can
    never leave the logger's folder.

    Example:
        >>> path_safe_key("probes/cka/encoder.layer[0]/kernel")
        'probes/cka/encoder.layer_0_/kernel'
        >>> path_safe_key("../x//y")
        '_/x/_/y'
    """
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", part) for part in key.split("/")]
    return "/".join("_" if part in ("", ".", "..") else part for part in parts)


def sink_for(logger: Any) -> ArtefactSink | None:
    """The adapter of ``logger``, or ``None`` for a logger that takes scalars only."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "WandbLogger" in names:
        return WandbSink(logger)
    if "MLFlowLogger" in names:
        return MLflowSink(logger)
    if "CSVLogger" in names:
        return CSVSink(logger)
    try:
        experiment = getattr(logger, "experiment", None)
    except Exception:  # a logger that cannot build its writer is not ours to fix
        return None
    if hasattr(experiment, "add_histogram"):
        return TensorBoardSink(logger, experiment)
    return None


def artefact_sinks(trainer: Any, kind: Kind | None = None) -> list[ArtefactSink]:
    """The adapters of ``trainer.loggers`` that take ``kind`` (any artefact: ``None``).

    Empty on ranks other than global rank zero, which log nothing, so a caller may use the
    result to decide whether to draw a figure at all.
    """
    if not trainer.is_global_zero:
        return []
    sinks = [s for s in map(sink_for, trainer.loggers) if s is not None]
    return [s for s in sinks if kind is None or kind in s.kinds]


def tensorboard_writers(trainer: Any) -> list[GuardedWriter]:
    """Every TensorBoard-like ``SummaryWriter`` among ``trainer.loggers`` (duck-typed), guarded.

    For TensorBoard-only artefacts (``add_histogram_raw``); other artefacts go to every
    logger through :func:`artefact_sinks`. Each writer's ``add_*`` calls are guarded
    (:class:`GuardedWriter`): a failing one is warned about once and skipped.
    """
    sinks = [sink_for(logger) for logger in trainer.loggers]
    return [GuardedWriter(s) for s in sinks if isinstance(s, TensorBoardSink)]


class GuardedWriter:
    """A ``SummaryWriter`` whose ``add_*`` calls go through :func:`deliver`.

    An ``add_*`` method that raises, or that the writer lacks, is warned about once per
    logger and method and skipped, so that a TensorBoard-only artefact cannot fail a probe.

    Args:
        sink: The writer's adapter.
    """

    def __init__(self, sink: TensorBoardSink) -> None:
        self.sink = sink

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_"):
            return getattr(self.sink.writer, name)

        def add(tag: str, *args: Any, **kwargs: Any) -> None:
            step = int(kwargs.get("global_step", -1))
            send = lambda: getattr(self.sink.writer, name)(tag, *args, **kwargs)  # noqa: E731
            deliver(self.sink, name.removeprefix("add_"), tag, step, send)

        return add


_warned: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def deliver(sink: ArtefactSink, kind: str, key: str, step: int, send: Any) -> None:
    """Call ``send()``; if the logger raises, warn once per logger and kind, and go on.

    A logger's failure (a full disk, a lost connection, a package version it does not like)
    must not stop training, the probe's other values, or the other loggers.
    """
    try:
        send()
    except Exception as err:
        try:
            seen = _warned.setdefault(sink.logger, set())
        except TypeError:  # a logger that cannot be weakly referenced: warn every time
            seen = set()
        if kind not in seen:
            seen.add(kind)
            rank_zero_warn(
                f"lightning_probes: {sink.name} failed to log the {kind} `{key}` at step "
                f"{step}; it was skipped, and training and the other loggers continue (shown "
                f"once per logger and kind). {type(err).__name__}: {err}"
            )


def _layout(pixels: np.ndarray) -> str:
    return "HW" if pixels.ndim == 2 else "HWC"
