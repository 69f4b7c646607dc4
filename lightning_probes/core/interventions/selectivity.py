r"""Class selectivity, information and ablation impact of single units (Morcos et al., 2018).

Units and intervention points are those of :mod:`lightning_probes.core.interventions`: by default
the activation module after each selected layer (post-nonlinearity), a unit being one feature
of a fully connected layer (averaged over positions when it is applied to a sequence
``[n, T, d]``) or one feature map of a conv layer (its activity spatially averaged). Section
3.4 of the paper asks whether a unit's class selectivity predicts the impact of ablating it;
:func:`unit_ablation_impact` measures that impact for every unit with the same vectorised
machinery as the cumulative ablation curves.

**Non-negative activity only.** The selectivity index (eq. 1) is defined for non-negative
activity (the paper's ReLU units): with negative class means it leaves ``[0, 1]`` and can
change sign or blow up (a denominator near 0). So :func:`selectivity_trace` refuses, before
anything is computed, every point whose module the registry does not know as non-negative
(:attr:`~lightning_probes.core.modules.LayerOps.non_negative`: ``ReLU``, ``ReLU6``,
``Sigmoid``, ``Softplus``, ``Hardsigmoid``, HF ``ReLUSquaredActivation``...): GELU, SiLU and
tanh outputs, a layer's raw output (``follow_activation=False``, or no activation module after
it) and residual branches (ResNet's ``downsample``) are refused with a message naming the
layer. No rectified or shifted form is substituted: it would be a different quantity under the
paper's name. Mutual information (:func:`unit_mutual_information`) has no such restriction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.hooks import capture
from lightning_probes.core.interventions.ablation import AblationValue
from lightning_probes.core.interventions.engine import evaluate_interventions
from lightning_probes.core.interventions.inputs import num_samples, run, take
from lightning_probes.core.interventions.masks import build_masks
from lightning_probes.core.interventions.trace import Trace, trace_model
from lightning_probes.core.layers import LayerNames
from lightning_probes.core.modules import ops_for
from lightning_probes.functional.selectivity import (
    binned_mutual_information,
    class_conditional_means,
    selectivity_index,
)


def unit_activity(
    model: nn.Module,
    inputs: Any,
    *,
    layers: LayerNames,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Activity of every unit on every sample: ``{layer: [n, u]}`` (feature maps averaged).

    A unit's activity is its output averaged over every axis but samples and units: the
    spatial mean of a feature map, the mean over positions of a feature of a layer applied to
    a sequence ``[n, T, d]`` (units on the registry's unit axis, e.g. the ``d`` features of
    GPT-2's ``mlp.c_fc``).

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` probe inputs (a tensor, or a tuple/dict of tensors sharing axis 0).
        layers: As in :func:`~lightning_probes.core.interventions.ablation.ablation_curve`.
        follow_activation: Read the activation module after each named layer.
        output_fn: Maps the model output to logits ``[n, o]`` (used when tracing the model).
        chunk_size: Samples per forward pass.

    Returns:
        ``{layer: [n, u]}`` in float64.
    """
    trace = trace_model(model, inputs, layers, follow_activation, output_fn)
    return trace_activity(model, inputs, trace, chunk_size=chunk_size)


def trace_activity(
    model: nn.Module, inputs: Any, trace: Trace, *, chunk_size: int = 1024
) -> dict[str, Tensor]:
    """:func:`unit_activity` at the points of a :class:`Trace` already resolved."""
    parts: dict[str, list[Tensor]] = {p.layer: [] for p in trace.points}
    with torch.no_grad(), capture({p.layer: p.module for p in trace.points}) as rec:
        for s0 in range(0, num_samples(inputs), chunk_size):
            run(model, take(inputs, s0, s0 + chunk_size))
            for p in trace.points:
                out = rec[p.layer].outputs.pop().to(torch.float64)
                dim = 1 if p.unit_dim == 1 else out.ndim - 1
                out = out.movedim(dim, 1).flatten(2).mean(2) if out.ndim > 2 else out
                parts[p.layer].append(out)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def selectivity_trace(
    model: nn.Module,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    layers: LayerNames,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
) -> Trace:
    """Resolve the points of a selectivity probe on two samples; refuse what it cannot measure.

    Args:
        model: The classifier (eval mode).
        inputs: Probe inputs (a tensor, or a tuple/dict of tensors sharing axis 0).
        targets: If given, checked: ``[n]`` class indices (one class per sample).
        layers: As in :func:`~lightning_probes.core.interventions.ablation.ablation_curve`.
        follow_activation: Read the activation module after each named layer.
        output_fn: Maps the model output to logits ``[n, o]``.

    Returns:
        The :class:`~lightning_probes.core.interventions.trace.Trace`.

    Raises:
        ValueError: If ``targets`` are not one class per sample, or a point's activity can be
            negative (naming the layer, its point and what to pass instead).
    """
    if targets is not None and (targets.ndim != 1 or torch.is_floating_point(targets)):
        raise ValueError(
            "Expected `targets` to be [n] class indices for class selectivity (one class per "
            f"sample), got {targets.dtype} of shape {tuple(targets.shape)}. Token targets of a "
            "language model have no class per sample."
        )
    trace = trace_model(model, inputs, layers, follow_activation, output_fn)
    for p in trace.points:
        ops = ops_for(p.module)
        if ops is None or not ops.non_negative:
            raw = p.name == p.layer
            what = "the layer's raw output" if raw else "its output"
            raise ValueError(
                f"Class selectivity (Morcos et al. 2018, eq. 1) needs non-negative unit "
                f"activity, but layer {p.layer!r} is read at {p.name!r} "
                f"({type(p.module).__name__}) and {what} can be negative, which puts the index "
                "outside [0, 1]. Pass `layers=` naming layers followed by a non-negative "
                "activation module (ReLU, ReLU6, Sigmoid, Softplus, Hardsigmoid), or the "
                "activation module itself"
                + (", with `follow_activation=True`." if raw and not follow_activation else ".")
            )
    return trace


def num_outputs(model: nn.Module, inputs: Any, output_fn: OutputFn | None = None) -> int:
    """The width of the logits (last axis) on the first two samples: the number of classes."""
    with torch.no_grad():
        return int(as_logits(run(model, take(inputs, 0, 2)), output_fn).shape[-1])


def class_selectivity(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: LayerNames,
    num_classes: int,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
) -> dict[str, Tensor]:
    r"""Class selectivity index of every unit (Morcos et al., 2018, eq. 1).

    .. math:: \mathrm{SI} = \frac{\mu_{\max} - \mu_{-\max}}{\mu_{\max} + \mu_{-\max}}

    of the class-conditional mean activity (spatial mean for feature maps, mean over positions
    for sequences); dead units get 0. Classes absent from ``targets`` are left out of
    :math:`\mu_{-\max}`. The paper computes it on the test set: pass held-out data to follow
    it exactly. Only points with non-negative activity are measured (see the module
    docstring); the result is always in ``[0, 1]``.

    Args:
        model: The classifier (eval mode).
        inputs: ``[n, ...]`` inputs.
        targets: ``[n]`` class indices.
        layers: As in :func:`~lightning_probes.core.interventions.ablation.ablation_curve`.
        num_classes: Number of classes.
        follow_activation: Read the activation module after each named layer.
        output_fn: Maps the model output to logits ``[n, o]``.

    Returns:
        ``{layer: [u]}`` float64, in ``[0, 1]``.

    Raises:
        ValueError: If a point's activity can be negative (:func:`selectivity_trace`).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        >>> si = class_selectivity(net, torch.randn(30, 4), torch.arange(30) % 3, layers=None,
        ...                        num_classes=3)
        >>> si["0"].shape
        torch.Size([6])
    """
    trace = selectivity_trace(
        model, inputs, targets, layers=layers, follow_activation=follow_activation,
        output_fn=output_fn,
    )  # fmt: skip
    out = {}
    for name, act in trace_activity(model, inputs, trace).items():
        if bool((act < 0).any()):
            raise ValueError(
                f"Expected non-negative activity of layer {name!r} for class selectivity, got a "
                f"minimum of {float(act.min()):.3g}. Select layers followed by a ReLU."
            )
        means, present = class_conditional_means(act, targets, num_classes)
        out[name] = selectivity_index(means, present)
    return out


def unit_mutual_information(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: LayerNames,
    num_classes: int,
    num_bins: int = 10,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
) -> dict[str, Tensor]:
    """Mutual information (bits) between each unit's binned activity and the class.

    See :func:`~lightning_probes.functional.selectivity.binned_mutual_information`
    (Morcos et al., 2018, appendix A.5).

    Returns:
        ``{layer: [u]}`` float64.
    """
    acts = unit_activity(
        model, inputs, layers=layers, follow_activation=follow_activation, output_fn=output_fn
    )
    return {
        name: binned_mutual_information(act, targets, num_classes, num_bins)
        for name, act in acts.items()
    }


def unit_ablation_impact(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: LayerNames,
    value: AblationValue = "zero",
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
) -> dict[str, Tensor]:
    r"""Increase of the mean cross-entropy when each unit alone is ablated.

    .. math:: \Delta L_j = L(\text{unit } j \text{ clamped}) - L(\text{intact})

    The :math:`u` single-unit ablations of each point run as masks of one vectorised
    evaluation (shared prefix, expanded batch; see :mod:`lightning_probes.core.interventions`),
    point by point: a unit's mask then runs the network from its own point (or the block
    enclosing it) on, not from the first point of all (a unit of the last layer would re-run
    every earlier layer per mask). The paper (sec. 3.4) measures it on the test loss of
    networks trained on true labels.

    Args:
        model: The classifier (eval mode).
        inputs: ``[n, ...]`` inputs.
        targets: ``[n]`` class indices.
        layers: As in :func:`~lightning_probes.core.interventions.ablation.ablation_curve`.
        value: ``"zero"`` or ``"mean"`` (see :func:`ablation_curve`).
        follow_activation: Ablate the activation after each named layer.
        output_fn: Maps the model output to logits.
        memory_budget: Approximate bytes of activations per forward pass.

    Returns:
        ``{layer: [u]}`` float64 loss increases (negative: ablation helped).
    """
    if value not in ("zero", "mean"):
        raise ValueError(f"`value` can be 'zero' or 'mean', got {value!r}.")
    trace = trace_model(model, inputs, layers, follow_activation, output_fn, targets)
    impact = {}
    for point in trace.points:
        own = trace_model(model, inputs, [point.layer], follow_activation, output_fn, targets)
        units = point.num_units
        keep = torch.ones(units + 1, units, dtype=torch.bool, device="cpu")  # moved by build_masks
        keep[1:].fill_diagonal_(False)  # row 0: intact; row 1 + j: unit j ablated
        masks = build_masks(model, inputs, own, keep, value)
        _, loss = evaluate_interventions(
            model,
            inputs,
            targets,
            own,
            units + 1,
            masks,
            masks=masks,
            with_loss=True,
            output_fn=output_fn,
            memory_budget=memory_budget,
        )
        assert loss is not None
        impact[point.layer] = loss[1:] - loss[0]
    return impact
