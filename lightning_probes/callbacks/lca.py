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

Memory, in parameter-sized buffers beyond the model's weights, gradients and optimizer state:
:math:`\theta_t`, the kept gradient and the cumulative LC between steps; during an allocation
one evaluation point more, while the step's LC is formed in the kept gradient's buffer (autograd
adds the new gradients straight into it): at most **4** with ``simpson`` or ``first_order``,
5 with ``adaptive`` (its odd-point accumulator), 6 while ``adaptive`` refines. Per-step sums,
histograms and the Weibull fit read the LC one layer or one block at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import NonFiniteValueError, ProbeCallback
from lightning_probes.callbacks.plots.lca import ROOT_LAYER, log_artefacts
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import LossFn, OutputFn, probe_loss
from lightning_probes.core.lca.allocation import (
    METHODS,
    IntegrationRule,
    loss_change_allocation,
    model_loss_and_grad,
)
from lightning_probes.functional.lca import fraction_helped, layer_sums

BatchNormMode = Literal["batch", "running"]
_HISTORY_COLUMNS = ("step", "loss_before", "loss_after", "lc", "error", "splits", "helped")


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
        max_splits: Upper bound on the splits of ``adaptive``.
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
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 1}

    def __init__(
        self,
        *,
        method: IntegrationRule = "adaptive",
        splits: int = 2,
        tolerance: float = 1e-3,
        max_splits: int = 32,
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
        if batchnorm not in ("batch", "running"):
            raise ValueError(f"`batchnorm` can be 'batch' or 'running', got {batchnorm!r}.")
        for name, value in (("window", window), ("artefact_every_n_steps", artefact_every_n_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"Expected `chunk_size` to be a positive int or None, got {chunk_size!r}."
            )
        # validated once here, with the same messages as the core function
        loss_change_allocation(
            lambda p: p["x"].sum(), {"x": torch.zeros(1)}, {"x": torch.zeros(1)},
            method=method, splits=splits, tolerance=tolerance, max_splits=max_splits,
        )  # fmt: skip
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
        self._before: dict[str, Tensor] | None = None  # θ_t (or the last θ_{t+1}, kept)
        self._cache: tuple[Tensor | float, dict[str, Tensor]] | None = None  # grad at _before
        self._cache_buffers: dict[str, Tensor] = {}
        self._pending = False
        self._cumulative: dict[str, Tensor] = {}
        self._history: list[tuple[float, ...]] = []
        self._skipped = 0
        self.grad_evals = 0
        """Gradient evaluations on the LCA set so far (reused ones not counted)."""

    # ------------------------------------------------------------------ public state
    @property
    def cumulative_lc(self) -> dict[str, Tensor]:
        """``{parameter name: Σ over instrumented steps of LC}`` (parameter shapes)."""
        return dict(self._cumulative)

    @property
    def history(self) -> Tensor:
        """``[m, 7]`` rows ``(step, L(θ_t), L(θ_{t+1}), Σ LC, error, splits, fraction helped)``.

        One row per allocated step (float64); the loss is on the LCA set.
        """
        return torch.tensor(self._history, dtype=torch.float64).reshape(-1, len(_HISTORY_COLUMNS))

    @property
    def skipped_steps(self) -> int:
        """Instrumented steps in which no parameter moved (e.g. skipped by the GradScaler)."""
        return self._skipped

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
    def on_probe_set_ready(
        self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet
    ) -> None:
        # "64-true"/"bf16-true" convert the model and each batch, not a probe set drawn earlier
        dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), None)
        if (
            dtype is not None
            and isinstance(data.inputs, Tensor)
            and data.inputs.is_floating_point()
        ):
            self._probe_set = ProbeSet(data.inputs.to(dtype), data.targets)

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        r"""Predicted cost of the first allocated step (see :meth:`ProbeCallback.predict_cost`).

        Cold, a step needs the gradient at :math:`\theta_t`, at the midpoints and at
        :math:`\theta_{t+1}` on the LCA set: ``splits + 1`` gradient evaluations (first order:
        one), each about three forward passes.
        """
        evaluations = 1 if self.method == "first_order" else self.splits + 1
        return units.seconds(forwards=3 * evaluations)

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
        params = self._trainable(pl_module)
        kept, buffers = self._before, self._loss_buffers(pl_module)
        if (
            kept is None
            or kept.keys() != params.keys()
            or not all(torch.equal(kept[k], p) for k, p in params.items())
        ):
            self._cache = None  # the parameters moved outside the optimizer: recompute
            self._before = {k: p.detach().clone() for k, p in params.items()}
        elif self._cache is not None and not _all_equal(self._cache_buffers, buffers):
            self._cache = None  # e.g. BatchNorm running statistics: the loss itself changed
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
        except BaseException:
            self._release()
            raise

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "cumulative": {k: v.detach().cpu().clone() for k, v in self._cumulative.items()},
            "history": self.history,
            "skipped": self._skipped,
            "grad_evals": self.grad_evals,
        }

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._cumulative = {k: v.clone() for k, v in state.get("cumulative", {}).items()}
        history = state.get("history")
        self._history = [] if history is None else [tuple(r) for r in history.tolist()]
        self._skipped = int(state.get("skipped", 0))
        self.grad_evals = int(state.get("grad_evals", 0))

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "window": self.window, "method": self.method}

    # ------------------------------------------------------------------ internals
    def _allocate(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        before = self._before
        assert before is not None
        params = dict(pl_module.named_parameters())
        after = {k: params[k].detach() for k in before}
        if self.batchnorm == "batch":  # the authors' choice; isolated() restores the buffers
            for m in pl_module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        step = trainer.global_step
        keep = self.instruments(step + 1)
        kw = {"loss_fn": self.loss_fn, "output_fn": self.output_fn, "chunk_size": self.chunk_size}
        result = loss_change_allocation(
            lambda p: probe_loss(pl_module, data, p, **kw),  # type: ignore[arg-type]
            before,
            after,
            method=self.method,
            splits=self.splits,
            tolerance=self.tolerance,
            max_splits=self.max_splits,
            loss_and_grad=model_loss_and_grad(pl_module, data, **kw),  # type: ignore[arg-type]
            start=self._take_cache(),
            keep_grad_after=keep,
        )
        self.grad_evals += result.grad_evals
        if result.splits == 0:  # nothing moved (GradScaler skip): nothing to allocate
            self._skipped += 1
            self._keep(result.loss_after, result.grad_after) if keep else self._release()
            return
        values = [result.total, result.loss_before, result.loss_after]
        if not all(torch.isfinite(torch.tensor(values))):
            raise NonFiniteValueError(f"the loss on the LCA set is not finite ({values})")
        lc = result.lc
        for name, p in params.items():
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros_like(p, dtype=torch.float32)
        for name, value in lc.items():
            cum = self._cumulative[name]
            self._cumulative[name] = cum.to(
                value.device, torch.promote_types(cum.dtype, value.dtype)
            )
            self._cumulative[name].add_(value)
        self._history.append(
            (
                step,
                result.loss_before,
                result.loss_after,
                result.total,
                result.error,
                result.splits,
                fraction_helped(lc.values()),
            )
        )
        if keep:
            for k in before:
                before[k].copy_(after[k])
            self._keep(result.loss_after, result.grad_after)
            self._cache_buffers = {k: b.clone() for k, b in self._loss_buffers(pl_module).items()}
        else:
            self._release()
        self._log_step(trainer, pl_module, result.lc, result)
        if not keep or step % self.artefact_every_n_steps == 0 or _last_step(trainer):
            self._log_artefacts(trainer, pl_module, lc)

    def _log_step(
        self, trainer: Trainer, pl_module: LightningModule, lc: dict[str, Tensor], result: Any
    ) -> None:
        layers = list(dict.fromkeys(self._layer_of.values()))
        step_sums = layer_sums(lc, self._layer_of)
        cum_sums = layer_sums(self._cumulative, self._layer_of)
        metrics: dict[str, float] = {
            self.key("lc"): result.total,
            self.key("true_delta_loss"): result.true_delta,
            self.key("error"): result.error,
            self.key("splits"): float(result.splits),
            self.key("loss"): result.loss_after,
            self.key("fraction_helped"): self._history[-1][6],
            self.key("cumulative_lc"): sum(cum_sums.values()),
        }
        if result.true_delta != 0.0:
            metrics[self.key("relative_error")] = result.relative_error
        for layer in layers:
            metrics[self.key("lc", layer)] = step_sums.get(layer, 0.0)
            metrics[self.key("cumulative_lc", layer)] = cum_sums.get(layer, 0.0)
            own = [v for k, v in lc.items() if self._layer_of.get(k) == layer]
            if own:  # frozen layers: zero LC, and no fraction of zero parameters
                metrics[self.key("fraction_helped", layer)] = fraction_helped(own)
        self.log_scalars(trainer, pl_module, metrics)

    def _log_artefacts(
        self, trainer: Trainer, pl_module: LightningModule, lc: dict[str, Tensor]
    ) -> None:
        figures = (
            trainer.is_global_zero
            and bool(plog.tensorboard_writers(trainer))
            and self.figures_enabled()
        )
        metrics = log_artefacts(
            trainer,
            self.key,
            lc,
            self._cumulative,
            self._layer_of,
            self.history,
            per_neuron=self.per_neuron,
            figures=figures,
            seed=self.seed,
        )
        if metrics:
            self.log_scalars(trainer, pl_module, metrics)

    def _loss_buffers(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """Buffers the LCA loss depends on (a kept gradient is valid while they are unchanged).

        With ``batchnorm="batch"`` the BatchNorm running statistics do not enter the loss.
        """
        skip: set[str] = set()
        if self.batchnorm == "batch":
            for name, m in pl_module.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    skip.update(
                        f"{name}.{b}" if name else b for b, _ in m.named_buffers(recurse=False)
                    )
        return {k: b for k, b in pl_module.named_buffers() if k not in skip}

    def _trainable(self, pl_module: LightningModule) -> dict[str, Tensor]:
        return {k: p for k, p in pl_module.named_parameters() if p.requires_grad}

    def _take_cache(self) -> tuple[Tensor | float, dict[str, Tensor]] | None:
        cache, self._cache = self._cache, None
        return cache

    def _keep(self, loss: float, grads: dict[str, Tensor] | None) -> None:
        self._cache = None if grads is None else (loss, grads)

    def _release(self) -> None:
        self._before, self._cache, self._pending, self._cache_buffers = None, None, False, {}


def _all_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _last_step(trainer: Trainer) -> bool:
    """Whether fitting stops after this optimizer step (max_steps or the last epoch's end)."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    return bool(
        trainer.is_last_batch and max_epochs is not None and trainer.current_epoch + 1 >= max_epochs
    )
