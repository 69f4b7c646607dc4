"""``ProbeCallback``: the Lightning glue every probe stands on.

It decides *when* a probe runs (:class:`~lightning_probes.callbacks.schedule.ProbeSchedule`),
*on what data* (a fixed probe set, user-given or drawn once from the train loader), *how* it
runs without altering training (:func:`~lightning_probes.core.isolation.isolated`), and *where*
results go (:mod:`lightning_probes.logging`). A subclass implements :meth:`ProbeCallback.probe`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks import memory
from lightning_probes.callbacks.budget import (
    FIRST_RUN_ALLOWANCE,
    RunBudget,
    clock,
    monitored_without_budget,
    predict_first_run,
)
from lightning_probes.callbacks.checks import (
    NonFiniteValueError,
    all_finite,
    check_callable,
    check_choice,
    check_finite_metrics,
    check_loggers,
    check_max_overhead,
    check_positive_int,
    check_probe_targets,
    failure_warning,
)
from lightning_probes.callbacks.progress import shown_in_progress_bar
from lightning_probes.callbacks.schedule import ProbeSchedule
from lightning_probes.callbacks.shared import (
    draw_shared_probe_set,
    release_shared_work,
    shared_work,
)
from lightning_probes.callbacks.state import ProbeState
from lightning_probes.callbacks.strategies import check_strategy, probe_model
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import BatchToInputsTargets, ProbeSet, probe_set_from_tensors
from lightning_probes.core.isolation import isolated
from lightning_probes.core.precision import check_output_precision, computation_dtype
from lightning_probes.core.validation import check_probe_loss

OnError = Literal["warn", "raise"]

__all__ = ["NonFiniteValueError", "OnError", "ProbeCallback"]


class ProbeCallback(ProbeState):
    """Base class of every probe: schedule, probe set, isolation, logging, state.

    Subclasses set :attr:`probe_name` (the ``<probe>`` of metric keys), :attr:`needs_grad`
    and :attr:`default_schedule`, and implement :meth:`probe`, which receives the probe set
    inside an :func:`~lightning_probes.core.isolation.isolated` scope (eval mode, no autocast,
    ``.grad`` cleared and restored, RNG, buffers and hooks restored afterwards).

    Args:
        every_n_steps: Run after every n-th optimizer step (``trainer.global_step``).
        every_n_epochs: Run at the end of every n-th training epoch.
        at_steps: Run after exactly these optimizer steps (e.g. log-spaced).
        start_step: Do not run before this global step.
        probe_data: Fixed probe data: a tensor of inputs, a tuple ``(inputs, targets)`` or a
            map-style ``Dataset``. Default: ``probe_size`` samples drawn once from the train
            dataloader at the start of fitting.
        probe_size: Number of samples to draw when ``probe_data`` is not given.
        seed: Seed of the probe-set draw (the same samples on every rank) and of the probe's
            own randomness.
        batch_to_inputs_targets: ``batch -> (inputs, targets)`` for batches of other shapes.
        on_error: ``"warn"`` (default): a failing run is reported once with the probe's name
            and training continues; ``"raise"``: the error stops training.
        max_overhead: Wall-time budget of this probe as a fraction of the rest of the run
            (default :attr:`default_max_overhead`, 3%: six probes use at most 18% on their own
            clocks, under the 25% target of the whole suite); the first run may exceed it by
            up to :attr:`first_run_allowance` seconds (10 s), so every probe shows values
            early. See :mod:`~lightning_probes.callbacks.budget`. Skipped runs are counted and
            announced once. ``None`` runs at every scheduled step. Under DDP the decision is
            rank zero's, broadcast, so ranks never diverge.

    Exactly one of ``every_n_steps``, ``every_n_epochs``, ``at_steps`` may be given; none
    means the subclass's :attr:`default_schedule`. Probes run during ``fit`` only, never in the
    sanity check, validation or test loops.
    """

    probe_name: ClassVar[str] = "probe"
    needs_grad: ClassVar[bool] = False
    needs_targets: ClassVar[bool] = False
    needs_class_targets: ClassVar[bool] = False
    evaluates_loss: ClassVar[bool] = False  # fit start: the loss's shapes and determinism
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 50}
    default_max_overhead: ClassVar[float | None] = 0.03
    first_run_allowance: ClassVar[float] = FIRST_RUN_ALLOWANCE

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        at_steps: Iterable[int] | None = None,
        start_step: int = 0,
        probe_data: Any = None,
        probe_size: int = 256,
        seed: int = 0,
        batch_to_inputs_targets: BatchToInputsTargets | None = None,
        on_error: OnError = "warn",
        max_overhead: float | Literal["default"] | None = "default",
    ) -> None:
        self.schedule = ProbeSchedule.create(
            every_n_steps, every_n_epochs, at_steps, start_step, self.default_schedule
        )
        check_positive_int("probe_size", probe_size)
        check_choice("on_error", on_error, ("warn", "raise"))
        check_callable(
            "batch_to_inputs_targets", batch_to_inputs_targets, "batch -> (inputs, targets)"
        )
        if max_overhead == "default":
            max_overhead = self.default_max_overhead
        check_max_overhead(max_overhead)
        self._budget = RunBudget(max_overhead, self.first_run_allowance)  # type: ignore[arg-type]
        self.probe_data = probe_data
        self.probe_size = probe_size
        self.seed = seed
        self.batch_to_inputs_targets = batch_to_inputs_targets
        self.on_error = on_error
        self._probe_set = None if probe_data is None else probe_set_from_tensors(probe_data)
        self._given = self._probe_set  # built from `probe_data`, not yet shared
        self._runs = 0
        self._last_step = -1
        self._seen_step = 0
        self._warned: set[str] = set()
        self._failed = False

    # ------------------------------------------------------------------ configuration
    @property
    def max_overhead(self) -> float | None:
        """The wall-time budget, a fraction of the rest of the run (``None``: unlimited)."""
        return self._budget.max_overhead

    @max_overhead.setter
    def max_overhead(self, value: float | None) -> None:
        check_max_overhead(value)
        self._budget.max_overhead = value

    @property
    def probe_set(self) -> ProbeSet | None:
        """The fixed probe set (``None`` until fitting starts when it is drawn from data)."""
        return self._probe_set

    def use_probe_data(self, probe_data: Any) -> None:
        """Use ``probe_data`` as the fixed probe set, as if given to ``__init__`` (before fit)."""
        self.probe_data = probe_data
        self._probe_set = self._given = probe_set_from_tensors(probe_data)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)  # FSDP1, DeepSpeed: refused
        warning = check_loggers(trainer, type(self).__name__)
        if warning is not None:
            self._warn_once("no-tensorboard", warning)
        self.check_model(trainer, pl_module)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step = trainer.global_step
        started = self._budget.start(pl_module.device)
        try:  # an OOM turns the probe off (warned); configuration errors stop fit. FSDP2: replica
            prepare = lambda: self._prepare(trainer, probe_model(pl_module, self))  # noqa: E731
            failed = memory.prepare_or_out_of_memory(prepare, self, pl_module.device)
        finally:
            self._budget.charge_since(started, pl_module.device)
        if trainer.strategy.reduce_boolean_decision(failed is not None, all=False):
            self._probe_set = None  # off on every rank alike, so collectives stay matched
            self._warn_once("oom-start", failed or memory.off_on_another_rank(self), trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # the probe sets and weight copies shared during this fit
            release_shared_work(trainer)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        work = shared_work(trainer)  # probes with the same settings share one probe set
        if self._probe_set is None:
            self._probe_set = draw_shared_probe_set(
                trainer, self, self.probe_size, seed=self.seed, warn=self._warn_once
            )
        elif self._probe_set is self._given:  # the same user data: one collated copy for all
            self._probe_set = work.given_probe_set(self.probe_data, self._probe_set)
        self._given = None  # no CPU copy kept beyond this point
        dtype = computation_dtype(pl_module)  # "bf16-true": float32, "64-true": float64
        self._probe_set = work.on_device(self._probe_set, pl_module.device, dtype)
        check_probe_targets(self, self._probe_set)
        with isolated(pl_module, grad=False):  # configuration errors: once, before training
            self.validate(pl_module, self._probe_set)
            fn, name = getattr(self, "output_fn", None), type(self).__name__
            check_output_precision(pl_module, self._probe_set, name, fn, trainer.precision)
        self.check_restored_parameters(pl_module)
        self.on_probe_set_ready(trainer, pl_module, self._probe_set)
        if self.evaluates_loss:  # LossFn and OutputFn of the subclass, checked on 2 samples
            fns = [getattr(self, k, None) for k in ("loss_fn", "output_fn")]
            check_probe_loss(pl_module, self._probe_set, type(self).__name__, *fns)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook fires on every batch; run only on the batches
        # where an optimizer step happened (global_step advanced), once per step.
        stepped, self._seen_step = step != self._seen_step, step
        if (
            stepped
            and not self._should_skip(trainer)
            and self.schedule.step_based
            and self.schedule.runs_at_step(step)
        ):
            self._scheduled(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (
            not self._should_skip(trainer)
            and not self.schedule.step_based
            and self.schedule.runs_at_epoch_end(trainer.current_epoch, trainer.global_step)
        ):
            self._scheduled(trainer, pl_module, on_step=False)

    def _scheduled(self, trainer: Trainer, pl_module: LightningModule, *, on_step: bool) -> None:
        # Every rank reaches this at the same steps (the schedule depends on global_step
        # only), so collectives are safe here: the budget (rank zero decides for all) and
        # `after_run`, which runs on every rank whether its run succeeded, failed or was skipped.
        run = self._within_budget(trainer, pl_module)
        self._failed = not run
        if run:
            self._run(trainer, pl_module, on_step=on_step)
        self.after_run(trainer, pl_module, failed=self._failed)

    # ------------------------------------------------------------------ for subclasses
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        """Compute and log the probe's quantities (runs inside an isolated scope)."""
        raise NotImplementedError

    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Validate the model at ``setup`` (e.g. that the named layers exist)."""

    def after_run(self, trainer: Trainer, pl_module: LightningModule, *, failed: bool) -> None:
        """Called on every rank at every scheduled run, after it ran, failed or was skipped.

        The place for collectives (e.g. an early-stopping decision): a rank whose run failed
        still reaches it, so no rank waits for ever on another.
        """

    def validate(self, pl_module: LightningModule, data: ProbeSet) -> None:
        """Check at fit start that the probe can run on this model and data; raise if not.

        Runs once, inside an isolated no-grad scope, before the first training step, so that
        a misconfiguration (e.g. a selected layer called twice per forward) stops ``fit`` at
        once with a clear error instead of failing at every scheduled run.
        """

    def on_probe_set_ready(
        self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet
    ) -> None:
        """Called once at the start of fitting, with the probe set on the model's device."""

    def log_scalars(
        self, trainer: Trainer, pl_module: LightningModule, metrics: Mapping[str, float | Tensor]
    ) -> None:
        """Log scalars (keys from :meth:`key`) at the current step; monitorable by callbacks.

        Raises:
            NonFiniteValueError: If a value is NaN or infinite; :meth:`_run` then skips the
                rest of this run with one warning, and training continues.
        """
        check_finite_metrics(metrics)
        plog.log_scalars(trainer, pl_module, metrics, on_step=self._on_step)

    def key(self, quantity: str, layer: str | None = None) -> str:
        """``probes/<probe_name>/<layer>/<quantity>``."""
        return plog.metric_key(self.probe_name, quantity, layer)

    def figures_enabled(self) -> bool:
        """Whether matplotlib is there to draw figures (warns once when it is not)."""
        if plog.matplotlib_available():
            return True
        self._warn_once(
            "no-matplotlib",
            f"{type(self).__name__}: matplotlib is not installed, so figures are not logged "
            "(`pip install matplotlib`). Scalars, histograms and images are unaffected.",
        )
        return False

    @property
    def runs(self) -> int:
        """Runs completed so far (failed and skipped ones not counted)."""
        return self._runs

    @property
    def probe_seconds(self) -> float:
        """Wall time this probe has used in the current fit: fit-start work, predictions, runs."""
        return self._budget.probe_seconds

    @property
    def over_budget_skips(self) -> int:
        """Scheduled runs skipped so far to stay within ``max_overhead``."""
        return self._budget.over_budget_skips

    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted seconds of one run, before any run has been measured (``None``: unknown).

        The budget's prediction of the first run (:mod:`~lightning_probes.callbacks.budget`),
        so that an expensive probe on a short or fast run does not overshoot its budget before
        it has any measurement; stated in :class:`~lightning_probes.core.cost.CostUnits`
        (forward passes, dense flops, figures). ``None`` (default): the first run starts
        unpredicted, and may exceed the budget on a very short run.

        Args:
            pl_module: The model (inside ``isolated``, eval mode, no autograd).
            data: The probe set.
            units: Measured prices (forward pass over ``data``, flop rate, one figure).

        Returns:
            Seconds, or ``None``.
        """
        return None

    def _within_budget(self, trainer: Trainer, pl_module: LightningModule | None = None) -> bool:
        """Whether a scheduled run fits in ``max_overhead`` (rank zero decides for all ranks).

        Call only at points every rank reaches together (scheduled steps): it may broadcast.
        """
        if self.max_overhead is None or monitored_without_budget(trainer, self, self._warn_once):
            return True
        predict = None
        data = self._probe_set
        overridden = type(self).predict_cost is not ProbeCallback.predict_cost
        if overridden and pl_module is not None and data is not None:
            model = lambda: probe_model(pl_module, type(self).__name__)  # noqa: E731
            predict = lambda: predict_first_run(self, model(), data)  # noqa: E731
        fits = self._budget.admits(trainer, predict)
        if not fits:
            self._warn_once("over-budget", self._budget.skip_message(type(self).__name__))
        return fits

    def _warn_once(self, tag: str, message: str, trainer: Trainer | None = None) -> None:
        """Warn once per tag: from rank zero, or, given ``trainer`` under DDP, this rank."""
        if tag in self._warned:
            return
        self._warned.add(tag)
        if trainer is not None and trainer.world_size > 1:
            warnings.warn(f"[rank {trainer.global_rank}] {message}", stacklevel=3)
        else:
            rank_zero_warn(message)

    # ------------------------------------------------------------------ internals
    _on_step: bool | None = None

    def _should_skip(self, trainer: Trainer) -> bool:
        return bool(trainer.sanity_checking or not trainer.training or self._probe_set is None)

    def _run(self, trainer: Trainer, pl_module: LightningModule, *, on_step: bool) -> None:
        assert self._probe_set is not None
        self._last_step = trainer.global_step
        self._on_step = on_step
        started = clock(pl_module.device)  # after training's queued GPU work, not charged here
        try:
            model = probe_model(pl_module, self)  # FSDP2: weights gathered
            if not all_finite(model.parameters()):
                raise NonFiniteValueError("the model's parameters are not finite")
            data, device = self._probe_set, pl_module.device

            def attempt() -> None:
                with isolated(model, grad=self.needs_grad):
                    self.probe(trainer, model, data)

            with shown_in_progress_bar(trainer, type(self).__name__):  # in Lightning's bar
                memory.run_retrying(attempt, self, len(data), device, self._warn_once)  # OOM
            self._runs += 1
        except Exception as err:  # NaN/inf: skipped; else warned, or raised with "raise"
            self._failed = True
            tag, message = failure_warning(type(self).__name__, trainer.global_step, err, self)
            self._warn_once(tag, message, trainer)  # from the failing rank itself
        finally:
            self._on_step = None
            self._budget.record_run(started, pl_module.device)
