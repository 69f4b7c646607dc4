r"""``LossContributionCallback``: Loss Change Allocation live in TensorBoard.

Lan et al., "LCA: Loss Change Allocation for Neural Network Training", NeurIPS 2019. Each
instrumented optimizer step's change of the full-batch loss on a fixed LCA set is allocated to
every parameter, :math:`LC_i = \Delta_i \int_0^1 \partial_i L(\theta_t + s\Delta)\, ds`
(:func:`~lightning_probes.core.lca.loss_change_allocation`), then summed per layer and over
time. Negative LC: the parameter helped.

Lightning pitfalls handled here:

- :math:`\theta_t` is captured in ``on_before_optimizer_step`` (after ``backward``, before the
  update; clipping only changes ``.grad``), at the *first* call of a batch: with several
  optimizers (manual optimization) or closures called repeatedly (LBFGS) the parameters have
  not moved yet. With gradient accumulation the hook fires only on the stepping batch.
- :math:`\theta_{t+1}` is read in ``on_train_batch_end``, after every optimizer of the batch.
- A step the AMP ``GradScaler`` skipped leaves the parameters unchanged: nothing is allocated.
- When the next step is instrumented too, :math:`\theta_{t+1}` and the gradient there are kept
  as the next :math:`\theta_t` (Simpson in steady state: 2 gradient evaluations per step).
- :math:`\theta_t` is the Trainer's shared, read-only pre-step snapshot
  (:class:`~lightning_probes.callbacks.shared.WeightSnapshot`): a landscape probe running on
  the same step reads the same copy. The kept :math:`\theta_{t+1}` is offered as the next one.

Memory, in parameter-sized buffers beyond the model's weights, gradients and optimizer state:
:math:`\theta_t`, the kept gradient and the cumulative LC between steps; during an allocation
one evaluation point more, while the step's LC is formed in the kept gradient's buffer (autograd
adds the new gradients straight into it): at most **4** with ``simpson`` or ``first_order``,
5 with ``adaptive`` (its odd-point accumulator), 6 while ``adaptive`` refines. Per-step sums,
histograms and the Weibull fit read the LC one layer or one block at a time. The math is in
:mod:`lightning_probes.core.lca` (the step, the cumulative tracker); the figures in
:mod:`lightning_probes.callbacks.plots.lca`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pytorch_lightning import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.checks import (
    NonFiniteValueError,
    check_choice,
    check_chunk_size,
    check_positive_int,
)
from lightning_probes.callbacks.memory import is_out_of_memory, weights_before_step
from lightning_probes.callbacks.plots.lca import ROOT_LAYER, log_artefacts
from lightning_probes.callbacks.schedule import is_last_step
from lightning_probes.callbacks.shared import WeightSnapshot, shared_work
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.device import tensors_equal
from lightning_probes.core.evaluation import LossFn, OutputFn, probe_loss
from lightning_probes.core.lca.allocation import (
    METHODS,
    IntegrationRule,
    LCAResult,
    check_lca_arguments,
    loss_change_allocation,
)
from lightning_probes.core.lca.gradients import model_loss_and_grad
from lightning_probes.core.lca.tracker import (
    LCATracker,
    NonFiniteLossError,
    loss_buffers,
    use_batch_statistics,
)
from lightning_probes.core.precision import trained_parameters
from lightning_probes.functional.lca import layer_fraction_helped, layer_sums

BatchNormMode = Literal["batch", "running"]


class LossContributionCallback(ProbeCallback):
    r"""Loss Change Allocation per parameter, layer and step (Lan et al., NeurIPS 2019).

    Logged at each instrumented step (``probes/lca/...``): per layer ``lc`` (the step's
    :math:`\sum_{i \in l} LC_i`), ``cumulative_lc``, ``fraction_helped``; for the model ``lc``,
    ``true_delta_loss``, ``error`` (absolute), ``relative_error``, ``fraction_helped``,
    ``splits``, ``loss`` and ``cumulative_lc``. At the end of each window of instrumented steps
    (and every ``artefact_every_n_steps``): per-layer LC histograms, a figure of cumulative LC
    per layer, the loss curve rebuilt from LC against the measured one, the Weibull shape
    ``weibull_shape`` of :math:`|LC|` (with scipy) and, with ``per_neuron=True``, per-neuron
    sums (``neuron_fraction_helped`` and histograms).

    Args:
        method: ``"adaptive"`` (the authors': Simpson from 2 splits, doubled until the error
            is at most ``tolerance``), ``"simpson"`` (fixed ``splits``) or ``"first_order"``.
        splits: Even number of Simpson intervals (initial ones for ``adaptive``).
        tolerance: Absolute bound on :math:`|\Delta L - \sum_i LC_i|` for ``adaptive``.
        max_splits: Upper bound on the splits of ``adaptive``: 8 (the authors' code: 32), so a
            step costs at most 9 gradient evaluations (4.5x Simpson's 2); a step that needs more
            stops at 8 and logs its larger ``error`` (``max_splits=32``: the authors' rule).
        window: Instrument ``window`` consecutive steps from each scheduled step (steps
            ``s, ..., s + window - 1``); consecutive steps share gradients.
        chunk_size: Samples per forward/backward pass on the LCA set (memory bound).
        loss_fn: ``(outputs, targets) -> mean loss``; default cross-entropy / MSE.
        output_fn: Maps the model output to logits.
        batchnorm: ``"batch"`` (the authors': BatchNorm on the LCA chunk's statistics) or
            ``"running"`` (running statistics, as at evaluation). Dropout is always off.
        per_neuron: Also log per-neuron sums (weight over all axes but the output axis, plus
            bias).
        artefact_every_n_steps: Histograms/figures at least this often inside long windows.
        **kwargs: Schedule, probe set (``probe_size`` = size of the LCA set) and error
            handling of :class:`~lightning_probes.callbacks.base.ProbeCallback`. The default
            schedule instruments every step, as in the paper; ``every_n_epochs`` is refused.

    Raises:
        ValueError: On invalid arguments.

    Example:
        >>> LossContributionCallback(method="simpson", every_n_steps=50, window=5).window
        5
    """

    probe_name: ClassVar[str] = "lca"
    needs_grad: ClassVar[bool] = True
    needs_targets: ClassVar[bool] = True
    evaluates_loss: ClassVar[bool] = True
    parameter_states: ClassVar[tuple[str, ...]] = ("cumulative",)
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 1}

    def __init__(
        self,
        *,
        method: IntegrationRule = "adaptive",
        splits: int = 2,
        tolerance: float = 1e-3,
        max_splits: int = 8,
        window: int = 1,
        chunk_size: int | None = 1024,
        loss_fn: LossFn | None = None,
        output_fn: OutputFn | None = None,
        batchnorm: BatchNormMode = "batch",
        per_neuron: bool = False,
        artefact_every_n_steps: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not self.schedule.step_based:
            raise ValueError(
                "Expected a step schedule (`every_n_steps` or `at_steps`) for "
                f"LossContributionCallback, got every_n_epochs={self.schedule.every_n_epochs}."
            )
        if method not in METHODS:
            raise ValueError(f"`method` can be {', '.join(map(repr, METHODS))}, got {method!r}.")
        check_choice("batchnorm", batchnorm, ("batch", "running"))
        check_positive_int("window", window)
        check_positive_int("artefact_every_n_steps", artefact_every_n_steps)
        check_chunk_size(chunk_size)
        # validated once here, with the same messages as the core function
        check_lca_arguments(method, splits, tolerance, max_splits)
        self.method = method
        self.splits = splits
        self.tolerance = tolerance
        self.max_splits = max_splits
        self.window = window
        self.chunk_size = chunk_size
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.batchnorm = batchnorm
        self.per_neuron = per_neuron
        self.artefact_every_n_steps = artefact_every_n_steps
        self._layer_of: dict[str, str] = {}
        # θ_t: the shared read-only pre-step snapshot, or the last θ_{t+1}, kept and offered
        self._before: WeightSnapshot | None = None
        self._cache: tuple[Tensor | float, dict[str, Tensor]] | None = None  # grad at _before
        self._cache_buffers: dict[str, Tensor] = {}
        self._pending = False
        self._tracker = LCATracker()

    # ------------------------------------------------------------------ public state
    @property
    def cumulative_lc(self) -> dict[str, Tensor]:
        """``{parameter name: Σ over instrumented steps of LC}`` (parameter shapes)."""
        return dict(self._tracker.cumulative)

    @property
    def history(self) -> Tensor:
        """``[m, 7]`` rows ``(step, L(θ_t), L(θ_{t+1}), Σ LC, error, splits, fraction helped)``.

        One row per allocated step (float64); the loss is on the LCA set.
        """
        return self._tracker.history

    @property
    def skipped_steps(self) -> int:
        """Instrumented steps in which no parameter moved (e.g. skipped by the GradScaler)."""
        return self._tracker.skipped

    @property
    def grad_evals(self) -> int:
        """Gradient evaluations on the LCA set so far (reused ones not counted)."""
        return self._tracker.grad_evals

    def instruments(self, step: int) -> bool:
        """Whether optimizer step ``step`` (the ``global_step`` after it) is allocated."""
        return any(self.schedule.runs_at_step(step - j) for j in range(self.window))

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layer_of = {
            name: name.rpartition(".")[0] or ROOT_LAYER for name, _ in pl_module.named_parameters()
        }

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        r"""Predicted cost of the first allocated step (see :meth:`ProbeCallback.predict_cost`).

        Cold, a step needs the gradient at :math:`\theta_t`, at the midpoints and at
        :math:`\theta_{t+1}` on the LCA set: ``splits + 1`` gradient evaluations (first order:
        one), each about three forward passes; and its artefacts: two figures and the Weibull
        fit of ``|LC|`` (priced as a third).
        """
        evaluations = 1 if self.method == "first_order" else self.splits + 1
        figures = 3 if plog.matplotlib_available() else 0
        return units.seconds(forwards=3 * evaluations, figures=figures)

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        if self._pending or self._should_skip(trainer):
            return  # a second optimizer (or closure call) of this batch: θ_t is already held
        # over budget, the window ends here (the next allocation starts cold, 3 evaluations)
        if not self.instruments(trainer.global_step + 1) or not self._within_budget(
            trainer, pl_module
        ):
            self._release()
            return
        kept, buffers = self._before, self._loss_buffers(pl_module)
        # one read-only copy per step, shared with other probes (the kept θ_{t+1} if unmoved)
        step = trainer.global_step + 1
        self._before = weights_before_step(trainer, pl_module, step, self, self._warn_once)
        if self._before is None:  # no memory for θ_t (warned): this step is not allocated
            self._release()
            return
        if kept is None or (self._before is not kept and not kept.equals(self._before.tensors)):
            self._cache = None  # the parameters moved outside the optimizer: recompute
        elif self._cache is not None and not tensors_equal(self._cache_buffers, buffers):
            self._cache = None  # e.g. BatchNorm running statistics: the loss itself changed
        del kept
        self._pending = True

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self._pending:
            return
        self._pending = False
        self._run(trainer, pl_module, on_step=True)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()  # θ_t and the cached gradient are not needed after fitting

    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        try:
            self._allocate(trainer, pl_module, data)
        except BaseException as err:
            if not is_out_of_memory(err):  # an OOM keeps θ_t: the run is retried, smaller chunks
                self._release()
            raise

    @override
    def extra_state(self) -> dict[str, Any]:
        return self._tracker.state_dict()

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._tracker.load_state_dict(state)

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "window": self.window, "method": self.method}

    # ------------------------------------------------------------------ internals
    def _allocate(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        snapshot = self._before  # θ_t: read-only, dropped once allocated
        assert snapshot is not None
        params = dict(pl_module.named_parameters())
        # θ_{t+1} in the training dtype (kept as the next θ_t); the allocation widens it
        trained = trained_parameters(pl_module)
        after = {k: trained[k] for k in snapshot.tensors}
        if self.batchnorm == "batch":  # the authors' choice; isolated() restores the buffers
            use_batch_statistics(pl_module)
        step = trainer.global_step
        keep = self.instruments(step + 1)
        kw = {"loss_fn": self.loss_fn, "output_fn": self.output_fn, "chunk_size": self.chunk_size}
        result = loss_change_allocation(
            lambda p: probe_loss(pl_module, data, p, **kw),  # type: ignore[arg-type]
            snapshot.tensors,
            after,
            method=self.method,
            splits=self.splits,
            tolerance=self.tolerance,
            max_splits=self.max_splits,
            loss_and_grad=model_loss_and_grad(pl_module, data, **kw),  # type: ignore[arg-type]
            start=self._cache,
            keep_grad_after=keep,
        )
        self._before = self._cache = None
        try:
            self._tracker.record(step, result, params)
        except NonFiniteLossError as err:
            raise NonFiniteValueError(str(err)) from err
        if result.splits == 0:  # nothing moved (GradScaler skip): θ_{t+1} is θ_t
            self._before = snapshot
            self._keep(trainer, result.loss_after, result.grad_after) if keep else self._release()
            return
        del snapshot  # freed before θ_{t+1} is copied (unless another probe still reads it)
        if keep:
            self._before = WeightSnapshot.copy_of(after)
            self._keep(trainer, result.loss_after, result.grad_after)
            self._cache_buffers = {k: b.clone() for k, b in self._loss_buffers(pl_module).items()}
        else:
            self._release()
        self._log_step(trainer, pl_module, result.lc, result)
        if not keep or step % self.artefact_every_n_steps == 0 or is_last_step(trainer):
            self._log_artefacts(trainer, pl_module, result.lc)

    def _log_step(
        self, trainer: Trainer, pl_module: LightningModule, lc: dict[str, Tensor], result: LCAResult
    ) -> None:
        layers = list(dict.fromkeys(self._layer_of.values()))
        step_sums = layer_sums(lc, self._layer_of)
        cum_sums = layer_sums(self._tracker.cumulative, self._layer_of)
        metrics: dict[str, float] = {
            self.key("lc"): result.total,
            self.key("true_delta_loss"): result.true_delta,
            self.key("error"): result.error,
            self.key("splits"): float(result.splits),
            self.key("loss"): result.loss_after,
            self.key("fraction_helped"): self._tracker.last_fraction_helped,
            self.key("cumulative_lc"): sum(cum_sums.values()),
        }
        if result.true_delta != 0.0:
            metrics[self.key("relative_error")] = result.relative_error
        helped = layer_fraction_helped(lc, self._layer_of)  # layers with allocated parameters
        for layer in layers:
            metrics[self.key("lc", layer)] = step_sums.get(layer, 0.0)
            metrics[self.key("cumulative_lc", layer)] = cum_sums.get(layer, 0.0)
            if layer in helped:  # frozen layers: zero LC, and no fraction of zero parameters
                metrics[self.key("fraction_helped", layer)] = helped[layer]
        self.log_scalars(trainer, pl_module, metrics)

    def _log_artefacts(
        self, trainer: Trainer, pl_module: LightningModule, lc: dict[str, Tensor]
    ) -> None:
        figures = (
            trainer.is_global_zero
            and bool(plog.artefact_sinks(trainer, "image"))
            and self.figures_enabled()
        )
        metrics = log_artefacts(
            trainer,
            self.key,
            lc,
            self._tracker.cumulative,
            self._layer_of,
            self.history,
            per_neuron=self.per_neuron,
            figures=figures,
            seed=self.seed,
        )
        if metrics:
            self.log_scalars(trainer, pl_module, metrics)

    def _loss_buffers(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return loss_buffers(pl_module, batch_statistics=self.batchnorm == "batch")

    def _keep(self, trainer: Trainer, loss: float, grads: dict[str, Tensor] | None) -> None:
        """Keep θ_{t+1} and the gradient there for the next step; offer the copy to others."""
        self._cache = None if grads is None else (loss, grads)
        if self._before is not None:
            shared_work(trainer).offer(self._before)

    def _release(self) -> None:
        self._before, self._cache, self._pending, self._cache_buffers = None, None, False, {}
