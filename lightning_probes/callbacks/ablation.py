"""``AblationAUCCallback``: reliance on single directions as a training signal.

Morcos et al. (ICLR 2018), "On the importance of single directions for generalization": the
area under the cumulative ablation curve (accuracy on the *training* set as random units are
clamped to 0) is lower for networks that memorise and tracks generalisation without held-out
data (sec. 3.2); this callback logs it and can stop training on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.checks import check_choice, check_int_at_least, check_positive_int
from lightning_probes.callbacks.plots.ablation import log_ablation_figures
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn
from lightning_probes.core.interventions.ablation import (
    AblationCurve,
    AblationValue,
    NoiseCurve,
    ablation_curve,
    default_ablation_layers,
    noise_curve,
)
from lightning_probes.core.interventions.engine import trace_model
from lightning_probes.core.layers import check_layer_spec, select_layers
from lightning_probes.functional.ablation import curve_area

_MONITORS = ("auc", "auc_normalized")


class AblationAUCCallback(ProbeCallback):
    r"""Log the cumulative ablation curve and its AUC; optionally early-stop on it.

    At each run, units of ``layers`` (post-nonlinearity; see
    :mod:`lightning_probes.core.ablation`) are ablated cumulatively in ``num_orderings`` random
    orders (the same orders every run, seeded by ``seed``, so runs are comparable) and the
    accuracy on the probe set — drawn from the **training** data, as in the paper — is measured
    at ``num_points`` fractions from 0 to 1. Logged (``probes/ablation/...``): ``auc``
    (:math:`\int_0^1 \mathrm{acc}(f) df`), ``auc_normalized`` (divided by the unablated
    accuracy), ``accuracy`` (unablated), ``noise_auc`` with ``noise=True``; to TensorBoard the
    curve (mean ± std over orderings) and the noise curve as figures.

    ``EarlyStopping(monitor="probes/ablation/auc", mode="max")`` works: the value is logged
    through ``LightningModule.log`` before monitoring callbacks run, and removed from
    ``trainer.callback_metrics`` at each epoch start, so an epoch in which the probe did not run
    holds no stale value (use ``EarlyStopping(strict=False)`` for schedules that skip epochs).
    Or use ``early_stopping=True``: training stops when ``monitor`` has not improved by more than
    ``min_delta`` for ``patience`` runs (decided via ``strategy.reduce_boolean_decision``; the
    state survives checkpoints).

    Args:
        layers: Layer names/globs; ``None``: MLPs all hidden layers, conv nets the last three
            conv layers (the paper's choices).
        num_orderings: Random orderings per run.
        num_points: Points on the curve (fractions ``linspace(0, 1, num_points)``).
        value: ``"zero"`` (the paper) or ``"mean"`` (appendix A.1).
        follow_activation: Ablate the activation after each named layer.
        noise: Also compute the noise curve (Gaussian noise scaled by each unit's std).
        noise_scales: Scales of the noise curve (default ``logspace(-2, 1, 7)``).
        early_stopping: Stop training when ``monitor`` stops improving.
        patience: Runs without improvement before stopping.
        min_delta: Smallest increase that counts as an improvement.
        monitor: ``"auc"`` or ``"auc_normalized"``, for ``early_stopping``.
        output_fn: Maps the model output to logits ``[n, o]``.
        memory_budget: Approximate bytes of activations per forward pass.
        probe_size: Probe samples drawn from the training data (default 512).
        **kwargs: :class:`~lightning_probes.callbacks.base.ProbeCallback` arguments (schedule,
            ``probe_data``, ``seed``, ...). Default schedule: every epoch.

    Example:
        >>> cb = AblationAUCCallback(num_orderings=5, num_points=11, early_stopping=True)
    """

    probe_name = "ablation"
    needs_grad = False
    needs_targets = True
    needs_class_targets = True
    default_schedule = {"every_n_epochs": 1}  # noqa: RUF012

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        *,
        num_orderings: int = 10,
        num_points: int = 11,
        value: AblationValue = "zero",
        follow_activation: bool = True,
        noise: bool = False,
        noise_scales: Sequence[float] | None = None,
        early_stopping: bool = False,
        patience: int = 3,
        min_delta: float = 0.0,
        monitor: str = "auc",
        output_fn: OutputFn | None = None,
        memory_budget: int = 2**25,
        probe_size: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_size=probe_size, **kwargs)
        check_layer_spec(layers)
        check_int_at_least("num_orderings", num_orderings, 1)
        check_int_at_least("num_points", num_points, 2)
        check_positive_int("patience", patience)
        check_choice("value", value, ("zero", "mean"))
        if monitor not in _MONITORS:
            raise ValueError(f"`monitor` can be {', '.join(_MONITORS)}, got {monitor!r}.")
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"Expected `min_delta` to be a number >= 0, got {min_delta!r}.")
        self.layers = layers
        self.num_orderings = num_orderings
        self.num_points = num_points
        self.value = value
        self.follow_activation = follow_activation
        self.noise = noise
        self.noise_scales = (
            None if noise_scales is None else torch.tensor(noise_scales, device="cpu")
        )
        self.early_stopping = early_stopping
        self.patience = patience
        self.min_delta = float(min_delta)
        self.monitor = monitor
        self.output_fn = output_fn
        self.memory_budget = memory_budget
        self._best = float("-inf")
        self._wait = 0
        self._pending: float | None = None
        self._best_step = -1
        self.last_curve: AblationCurve | None = None

    # ------------------------------------------------------------------ configuration
    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "layers": self.layers, "value": self.value}

    @override
    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.layers is None:
            default_ablation_layers(pl_module)
        else:
            select_layers(pl_module, self.layers)
        every_epoch = self.schedule.every_n_epochs == 1 and self.schedule.start_step == 0
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            watches = isinstance(cb, EarlyStopping) and cb.monitor.startswith("probes/ablation/")
            if watches and cb.strict and not every_epoch:
                self._warn_once(
                    "strict-es",
                    f"{type(self).__name__} does not run every epoch, and `EarlyStopping("
                    f"monitor={cb.monitor!r})` is strict: epochs without a run hold no "
                    "value (stale values are removed), so it will raise. Pass "
                    "`EarlyStopping(..., strict=False)` to skip those epochs.",
                )

    @override
    def validate(self, pl_module: LightningModule, data: ProbeSet) -> None:
        # resolves the intervention points on two samples: layers called more than once,
        # points shared by two layers or a model output without `output_fn` fail here
        trace_model(pl_module, data.inputs, self.layers, self.follow_activation, self.output_fn,
                    data.targets)  # fmt: skip

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning keeps `callback_metrics` across epochs: drop last run's values so that a
        # monitor never mistakes an old AUC for a new one in an epoch where the probe is idle.
        for quantity in ("auc", "auc_normalized", "accuracy", "noise_auc"):
            trainer.callback_metrics.pop(self.key(quantity), None)

    # ------------------------------------------------------------------ the probe
    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted cost of the first run (see :meth:`ProbeCallback.predict_cost`).

        One forward pass per mask (``num_orderings x num_points``; an upper bound, as masks
        share the prefix), the noise curves' passes, and a figure per curve.
        """
        forwards = self.num_orderings * self.num_points
        figures = 1
        if self.noise:
            scales = 10 if self.noise_scales is None else len(self.noise_scales)
            forwards += 3 * scales
            figures += 1
        return units.seconds(
            forwards=forwards, figures=figures if plog.matplotlib_available() else 0
        )

    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        curve = self._measure(pl_module, data)
        self.last_curve = curve
        metrics = {
            self.key("auc"): float(curve.auc),
            self.key("auc_normalized"): float(curve.normalized_auc),
            self.key("accuracy"): float(curve.mean[0]),
        }
        noise = self._measure_noise(pl_module, data) if self.noise else None
        if noise is not None:
            logs = torch.log10(noise.scales.clamp_min(1e-12))
            span = float(logs[-1] - logs[0]) or 1.0
            metrics[self.key("noise_auc")] = float(curve_area(logs, noise.mean)) / span
        self.log_scalars(trainer, pl_module, metrics)
        if plog.artefact_sinks(trainer, "image") and self.figures_enabled():
            log_ablation_figures(trainer, curve, noise)
        if self.early_stopping:  # decided in after_run, which every rank reaches
            self._pending = metrics[self.key(self.monitor)]

    @override
    def after_run(self, trainer: Trainer, pl_module: LightningModule, *, failed: bool) -> None:
        current, self._pending = self._pending, None
        if self.early_stopping:
            self._early_stop(trainer, None if failed else current)

    def _measure(self, pl_module: LightningModule, data: ProbeSet) -> AblationCurve:
        assert data.targets is not None
        return ablation_curve(
            pl_module,
            data.inputs,
            data.targets,
            layers=self.layers,
            num_orderings=self.num_orderings,
            fractions=torch.linspace(0, 1, self.num_points, device="cpu"),
            value=self.value,
            generator=torch.Generator().manual_seed(self.seed),
            follow_activation=self.follow_activation,
            output_fn=self.output_fn,
            memory_budget=self.memory_budget,
        )

    def _measure_noise(self, pl_module: LightningModule, data: ProbeSet) -> NoiseCurve:
        assert data.targets is not None
        return noise_curve(
            pl_module,
            data.inputs,
            data.targets,
            layers=self.layers,
            scales=self.noise_scales,
            num_repeats=3,
            generator=torch.Generator().manual_seed(self.seed),
            follow_activation=self.follow_activation,
            output_fn=self.output_fn,
            memory_budget=self.memory_budget,
        )

    def _early_stop(self, trainer: Trainer, current: float | None) -> None:
        step = trainer.global_step
        if current is None:  # this rank's run failed or was skipped: no vote to stop
            should_stop = False
        elif current > self._best + self.min_delta:
            self._best, self._wait, self._best_step = current, 0, step
            should_stop = False
        else:
            self._wait += 1
            should_stop = self._wait >= self.patience
        # every rank computed the same value; any rank deciding to stop stops all
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if should_stop and not trainer.should_stop:
            trainer.should_stop = True
            said = "n/a here (this rank's run failed)" if current is None else f"{current:.4f}"
            rank_zero_info(
                f"{type(self).__name__}: stopping training at epoch {trainer.current_epoch}, "
                f"step {step}: {self.key(self.monitor)} = {said} has not improved by more "
                f"than min_delta={self.min_delta} for {self._wait} runs (patience="
                f"{self.patience}); best {self._best:.4f} at step {self._best_step}."
            )

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "best": self._best,
            "wait": self._wait,
            "best_step": self._best_step,
        }

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._best = float(state.get("best", float("-inf")))
        self._wait = int(state.get("wait", 0))
        self._best_step = int(state.get("best_step", -1))
