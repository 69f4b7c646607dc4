"""The wall-time budget of a probe (``max_overhead``) and the prediction of its first run.

A scheduled run starts only if the probe's time so far (including its fit-start work) plus the
predicted cost of this run stays within ``max_overhead`` times the time spent on everything
else since training started. A run is predicted by the measured cost of the previous one; the
first by the probe's :meth:`~lightning_probes.callbacks.base.ProbeCallback.predict_cost`, in
:class:`~lightning_probes.core.cost.CostUnits` measured once on this model and probe set
(:func:`predict_first_run`). A probe that states no cost runs its first time unpredicted. Skipped
runs are counted (:attr:`RunBudget.over_budget_skips`).

So that every probe shows values early, the first run is admitted beyond the budget when it is
predicted to take at most ``first_run_allowance`` seconds (:data:`FIRST_RUN_ALLOWANCE`, 10 s):
the budget then holds later runs back until the first one's cost is paid for. The one-time
measurement of the machine's rates (:func:`~lightning_probes.core.cost.calibrate`) is shared by
every probe of the process and charged to none. On a GPU the clocks are read after the
device's queue is drained (``device=``), so training work still queued when a probe starts is
not charged to it, and the probe's own queued work is.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lightning_probes.core.cost import calibrate, format_seconds, machine_calibration_seconds
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.device import synchronize
from lightning_probes.core.isolation import isolated

#: Seconds a first run may take beyond the budget (so each probe shows values early).
FIRST_RUN_ALLOWANCE = 10.0


class RunBudget:
    """Book-keeping of one probe's wall time against ``max_overhead``.

    Args:
        max_overhead: The budget as a fraction of the rest of the run (``None``: unlimited).
        first_run_allowance: The first run is admitted beyond the budget when predicted to
            take at most this many seconds (``0``: the first run waits for the budget too).

    Attributes:
        probe_seconds: Wall time the probe has used in the current fit.
        over_budget_skips: Scheduled runs skipped so far to stay within the budget.

    Example:
        >>> budget = RunBudget(0.5)
        >>> started = budget.start()
        >>> budget.fits(predicted=0.0)
        True
    """

    def __init__(
        self, max_overhead: float | None, first_run_allowance: float = FIRST_RUN_ALLOWANCE
    ) -> None:
        self.max_overhead = max_overhead
        self.first_run_allowance = first_run_allowance
        self.probe_seconds = 0.0
        self.over_budget_skips = 0
        self._train_start = 0.0
        self._last_run_seconds = 0.0
        self._measured = False  # a run has been timed: the next is predicted by its cost
        self._first_run_prediction: float | None = None
        self._last_prediction = 0.0

    def start(self, device: torch.device | None = None) -> float:
        """Start the clocks of a fit; returns the start time (``time.perf_counter``).

        Args:
            device: The model's device: a CUDA device's queued work is waited for first.
        """
        self._train_start = clock(device)
        self.probe_seconds = 0.0
        return self._train_start

    def charge_since(self, started: float, device: torch.device | None = None) -> None:
        """Add the wall time since ``started`` (``time.perf_counter``) to the probe's time."""
        self.probe_seconds += clock(device) - started

    def record_run(self, started: float, device: torch.device | None = None) -> None:
        """Charge a run that started at ``started``; it predicts the next run's cost."""
        self._last_run_seconds = clock(device) - started
        self.probe_seconds += self._last_run_seconds
        self._measured = True

    def predicted_run_seconds(self, predict: Any = None) -> float:
        """Cost of the next run: the last run's, or, before the first, ``predict()``.

        Args:
            predict: ``() -> seconds or None`` for the first run, called once and timed (its
                cost counts as the probe's); ``None`` or a failing call predicts 0.
        """
        if self._measured:
            return self._last_run_seconds
        if self._first_run_prediction is None:
            prediction = 0.0
            if predict is not None:
                started, shared = time.perf_counter(), machine_calibration_seconds()
                try:
                    prediction = predict() or 0.0
                except Exception:  # a prediction must never stop training: run unpredicted
                    prediction = 0.0
                finally:  # the machine's rates, measured once per process, are no one's cost
                    self.charge_since(started + machine_calibration_seconds() - shared)
            self._first_run_prediction = prediction
        return self._first_run_prediction

    def admits(self, trainer: Any, predict: Any = None) -> bool:
        """Whether the next scheduled run fits (rank zero decides for all ranks); counts skips.

        A run is started only if, at the cost of the last one (or the predicted cost of the
        first, see :meth:`predicted_run_seconds`), it stays in budget. Call only at points every
        rank reaches together (scheduled steps): it may broadcast.
        """
        self._last_prediction = predicted = self.predicted_run_seconds(predict)
        first = not self._measured and predicted <= self.first_run_allowance
        fits = first or self.fits(predicted)
        if trainer.world_size > 1:
            fits = bool(trainer.strategy.broadcast(fits, src=0))
        if not fits:
            self.over_budget_skips += 1
        return fits

    def skip_message(self, owner: str) -> str:
        """The warning shown (once) when ``owner`` skips a run to stay within the budget.

        It states the numbers the decision was made on: the run's predicted cost and where it
        comes from, the time used so far, the training time, and how much more training the
        next run needs before it fits.
        """
        m, predicted, used = self.max_overhead or 0.0, self._last_prediction, self.probe_seconds
        elapsed = time.perf_counter() - self._train_start
        training = max(elapsed - used, 0.0)
        # fits when used + predicted <= m * (elapsed' - used): solve for the elapsed time
        wait = max((used + predicted) / m + used - elapsed, 0.0) if m else float("inf")
        what = "the last run took" if self._measured else "its first run is predicted to take"
        first = (
            ""
            if self._measured
            else f", more than the {format_seconds(self.first_run_allowance)} a first run "
            "may take beyond the budget"
        )
        return (
            f"{owner}: skipping scheduled runs to keep its cost within "
            f"`max_overhead={self.max_overhead}` of the training time: {what} "
            f"{format_seconds(predicted)}{first}; it has used {format_seconds(used)} in "
            f"{format_seconds(training)} of training, so the next run fits after about "
            f"{format_seconds(wait)} more training. Raise `max_overhead`, run less often "
            "(`every_n_steps`, `at_steps`) or on a smaller `probe_size`, or pass "
            "`max_overhead=None` to run at every scheduled step."
        )

    def fits(self, predicted: float) -> bool:
        """Whether a run of ``predicted`` seconds stays within the budget now."""
        if self.max_overhead is None:
            return True
        elapsed = time.perf_counter() - self._train_start  # after the prediction's own cost
        spent = self.probe_seconds + predicted
        return spent <= self.max_overhead * max(elapsed - self.probe_seconds, 0.0)


def clock(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` after the work queued on ``device`` (if CUDA) has finished.

    Example:
        >>> clock() > 0
        True
    """
    synchronize(device)
    return time.perf_counter()


def predict_first_run(probe: Any, model: nn.Module, data: ProbeSet) -> float | None:
    """``probe.predict_cost`` in units measured on ``model`` and ``data`` (isolated, no grad).

    Args:
        probe: A :class:`~lightning_probes.callbacks.base.ProbeCallback` (its ``output_fn``
            attribute, if any, maps the model output to logits).
        model: The model.
        data: The probe set.

    Returns:
        Predicted seconds of the probe's first run, or ``None``.
    """
    with isolated(model, grad=False):
        units = calibrate(model, data, output_fn=getattr(probe, "output_fn", None))
        return probe.predict_cost(model, data, units)  # type: ignore[no-any-return]


def monitored_without_budget(trainer: Any, probe: Any, warn: Any) -> bool:
    """Whether a callback monitors one of ``probe``'s metrics: then no run is skipped.

    ``EarlyStopping`` and ``ModelCheckpoint`` decide on the value in ``callback_metrics`` at
    their checks; a run skipped to keep the budget would leave them the previous run's value,
    and e.g. count epochs without improvement that were never measured. So a monitored probe
    runs at every scheduled step (warned once); its schedule is the way to bound its cost.

    Args:
        trainer: The Trainer (its callbacks' ``monitor``).
        probe: The probe (its ``probe_name`` and ``max_overhead``).
        warn: ``warn(tag, message)``.
    """
    prefix = f"probes/{probe.probe_name}/"
    monitors = [
        (type(cb).__name__, cb.monitor)
        for cb in getattr(trainer, "callbacks", [])
        if isinstance(getattr(cb, "monitor", None), str) and cb.monitor.startswith(prefix)
    ]
    if monitors:
        names = ", ".join(f"{name} monitors `{key}`" for name, key in monitors)
        warn(
            "monitored",
            f"{type(probe).__name__}: {names}, so every scheduled run is made whatever "
            f"`max_overhead={probe.max_overhead}` (a skipped run would leave the monitor a "
            "stale value). Bound its cost with the schedule (`every_n_epochs`, `every_n_steps`).",
        )
    return bool(monitors)
