"""``SelectivityCallback``: class selectivity of single units during training.

Morcos et al. (ICLR 2018), sec. 2.3 and 3.4: the class selectivity index of each unit, its
mutual information with the class, and whether either predicts how much the loss grows when
the unit is ablated (Spearman correlation per layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.checks import check_choice
from lightning_probes.callbacks.plots.selectivity import log_importance_scatter
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn
from lightning_probes.core.interventions.ablation import AblationValue, default_ablation_layers
from lightning_probes.core.interventions.selectivity import (
    num_outputs,
    selectivity_trace,
    trace_activity,
    unit_ablation_impact,
)
from lightning_probes.core.interventions.trace import Trace, trace_model
from lightning_probes.core.layers import check_layer_spec, select_layers
from lightning_probes.functional.selectivity import (
    binned_mutual_information,
    spearman_correlation,
)
from lightning_probes.functional.selectivity_summary import layer_selectivity


class SelectivityCallback(ProbeCallback):
    r"""Per-layer class selectivity of units; optionally MI and selectivity vs importance.

    Selectivity :math:`(\mu_{\max} - \mu_{-\max}) / (\mu_{\max} + \mu_{-\max})` of the
    class-conditional mean post-activation (feature maps spatially averaged; dead units 0) on
    the probe set (the paper uses the test set: pass ``probe_data=`` held-out data to match).
    Logged per layer (``probes/selectivity/<layer>/...``): ``mean``, ``frac_selective``
    (fraction above ``threshold``), ``frac_dead``; a ``selectivity`` histogram. With
    ``mutual_information=True``: ``mutual_info`` (mean, bits) and its histogram. With
    ``importance=True``: each unit's single-unit ablation loss increase, ``spearman_importance``
    (Spearman r between selectivity and that increase) and a scatter figure.

    Args:
        layers: Layer names/globs; ``None``: as :class:`AblationAUCCallback`.
        num_classes: Number of classes; ``None``: the model's output width.
        follow_activation: Read the activation module after each named layer.
        threshold: Selectivity above which a unit counts as highly selective.
        mutual_information: Also compute the binned mutual information.
        num_bins: Bins of the mutual information.
        importance: Also measure single-unit ablation impact and its Spearman r.
        value: Ablation value for ``importance`` (``"zero"`` or ``"mean"``).
        output_fn: Maps the model output to logits.
        memory_budget: Approximate bytes of activations per forward pass.
        probe_size: Probe samples drawn from the training data (default 512).
        **kwargs: :class:`~lightning_probes.callbacks.base.ProbeCallback` arguments.
            Default schedule: every epoch.
    """

    probe_name = "selectivity"
    needs_grad = False
    needs_targets = True
    needs_class_targets = True
    default_schedule = {"every_n_epochs": 1}  # noqa: RUF012

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        *,
        num_classes: int | None = None,
        follow_activation: bool = True,
        threshold: float = 0.5,
        mutual_information: bool = False,
        num_bins: int = 10,
        importance: bool = False,
        value: AblationValue = "zero",
        output_fn: OutputFn | None = None,
        memory_budget: int = 2**25,
        probe_size: int = 512,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_size=probe_size, **kwargs)
        check_layer_spec(layers)
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an int >= 2, got {num_classes!r}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"Expected `threshold` to be in [0, 1], got {threshold!r}.")
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"Expected `num_bins` to be an int >= 2, got {num_bins!r}.")
        check_choice("value", value, ("zero", "mean"))
        self.layers = layers
        self.num_classes = num_classes
        self.follow_activation = follow_activation
        self.threshold = threshold
        self.mutual_information = mutual_information
        self.num_bins = num_bins
        self.importance = importance
        self.value = value
        self.output_fn = output_fn
        self.memory_budget = memory_budget
        self._resolved: tuple[Trace, int] | None = None
        self.last_selectivity: dict[str, torch.Tensor] = {}
        self.last_impact: dict[str, torch.Tensor] = {}

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "layers": self.layers}

    @override
    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.layers is None:
            default_ablation_layers(pl_module)
        else:
            select_layers(pl_module, self.layers)

    @override
    def validate(self, pl_module: LightningModule, data: ProbeSet) -> None:
        # resolves the intervention points on two samples: layers called more than once,
        # points shared by two layers or a model output without `output_fn` fail here
        selectivity_trace(
            pl_module, data.inputs, data.targets, layers=self.layers,
            follow_activation=self.follow_activation, output_fn=self.output_fn,
        )  # fmt: skip

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted cost of the first run (see :meth:`ProbeCallback.predict_cost`).

        One forward pass capturing the activations; the single-unit ablations of
        ``importance=True`` (one masked pass per unit) are not predicted.
        """
        return None if self.importance else units.seconds(forwards=1)

    def _points(self, pl_module: LightningModule, x: Any) -> tuple[Trace, int]:
        """The traced points and the number of classes, kept while the model's modules stay.

        Tracing runs a few forwards of two or three samples; they are repeated only when a
        point's module is no longer the model's module of that name (another model, a
        replaced layer, an unsharded replica).
        """
        named = dict(pl_module.named_modules())
        kept = self._resolved
        if kept is None or any(named.get(p.name) is not p.module for p in kept[0].points):
            trace = trace_model(pl_module, x, self.layers, self.follow_activation, self.output_fn)
            classes = self.num_classes or num_outputs(pl_module, x, self.output_fn)
            kept = self._resolved = (trace, classes)
        return kept

    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        x, y = data.inputs, data.targets
        assert y is not None
        trace, classes = self._points(pl_module, x)
        acts = trace_activity(pl_module, x, trace)
        impact = {}
        if self.importance:
            impact = unit_ablation_impact(
                pl_module,
                x,
                y,
                layers=self.layers,
                value=self.value,
                follow_activation=self.follow_activation,
                output_fn=self.output_fn,
                memory_budget=self.memory_budget,
            )
        metrics: dict[str, float] = {}
        selectivity = {}
        for layer, act in acts.items():
            summary = layer_selectivity(act, y, classes, threshold=self.threshold)
            selectivity[layer] = si = summary.selectivity
            metrics[self.key("mean", layer)] = summary.mean
            metrics[self.key("frac_selective", layer)] = summary.frac_selective
            metrics[self.key("frac_dead", layer)] = summary.frac_dead
            plog.log_histogram(trainer, self.key("selectivity", layer), si)
            if self.mutual_information:
                mi = binned_mutual_information(act, y, classes, self.num_bins)
                metrics[self.key("mutual_info", layer)] = float(mi.mean())
                plog.log_histogram(trainer, self.key("mutual_info_hist", layer), mi)
            if self.importance:
                r = spearman_correlation(si, impact[layer])
                metrics[self.key("spearman_importance", layer)] = float(r)
                plog.log_histogram(trainer, self.key("ablation_impact", layer), impact[layer])
        self.last_selectivity, self.last_impact = selectivity, impact
        self.log_scalars(trainer, pl_module, metrics)
        if self.importance and plog.artefact_sinks(trainer, "image") and self.figures_enabled():
            log_importance_scatter(trainer, selectivity, impact)
