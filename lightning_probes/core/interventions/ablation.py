r"""Cumulative ablation and noise curves (Morcos et al., ICLR 2018, sec. 2.2, Fig. 1-2).

Units, intervention points (post-nonlinearity by default) and the vectorised evaluation of many
ablation masks in one forward pass are those of :mod:`lightning_probes.core.interventions`;
this module chooses the paper's default layers, draws the random cumulative orderings, and
summarises accuracy into curves and their area.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn
from lightning_probes.core.interventions.engine import evaluate_interventions
from lightning_probes.core.interventions.inputs import device_of
from lightning_probes.core.interventions.masks import build_masks, point_statistics, unit_view
from lightning_probes.core.interventions.points import AblationPoint
from lightning_probes.core.interventions.shortcuts import ShortcutPath
from lightning_probes.core.interventions.trace import (
    default_ablation_layers as default_ablation_layers,  # re-exported: the curves' policy
)
from lightning_probes.core.interventions.trace import trace_model
from lightning_probes.core.layers import LayerNames

AblationValue = Literal["zero", "mean"]


def ablation_points(
    model: nn.Module, inputs: Any, layers: LayerNames = None, *, follow_activation: bool = True
) -> dict[str, AblationPoint]:
    """Resolve the intervention point of each selected layer.

    See :mod:`lightning_probes.core.interventions` for how points are chosen.

    Args:
        model: The network (in eval mode).
        inputs: ``[n, ...]`` a few inputs (only the first two are run).
        layers: Names or globs of modules; ``None``: :func:`default_ablation_layers`.
        follow_activation: Move from a layer to the activation module after it.

    Returns:
        ``{layer name: AblationPoint}`` in definition order.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> p = ablation_points(net, torch.zeros(2, 4))["0"]
        >>> p.name, p.num_units
        ('1', 8)
    """
    return {p.layer: p for p in trace_model(model, inputs, layers, follow_activation).points}


@dataclass
class AblationCurve:
    """A cumulative ablation curve (Morcos et al., 2018, Fig. 1).

    Attributes:
        fractions: ``[k]`` fraction of all units ablated at each point, :math:`m_k / U`.
        counts: ``[k]`` number of units ablated, :math:`m_k`.
        accuracy: ``[r, k]`` accuracy on the probe set, per ordering and point.
        mean: ``[k]`` mean over orderings.
        std: ``[k]`` standard deviation over orderings (Bessel-corrected).
        auc: Area under the mean curve over ``fractions`` (0-d, float64; at most 1).
        normalized_auc: ``auc`` divided by the unablated accuracy.
        orderings: ``[r, U]`` the orders units were ablated in (global unit indices).
        num_units: ``{layer: u}``; global unit indices run over layers in this order.
        paths: Forward passes that took each shortcut of the engine
            (:attr:`~lightning_probes.core.interventions.trace.Trace.paths`).
    """

    fractions: Tensor
    counts: Tensor
    accuracy: Tensor
    mean: Tensor
    std: Tensor
    auc: Tensor
    normalized_auc: Tensor
    orderings: Tensor
    num_units: dict[str, int]
    paths: dict[str, int] = field(default_factory=dict)


@dataclass
class NoiseCurve:
    """Accuracy under Gaussian noise added to all units (Morcos et al., 2018, Fig. 2).

    Attributes:
        scales: ``[s]`` noise std in units of each unit's std on the probe set.
        accuracy: ``[repeats, s]`` accuracy per noise draw and scale.
        mean: ``[s]`` mean over draws.
        std: ``[s]`` standard deviation over draws.
    """

    scales: Tensor
    accuracy: Tensor
    mean: Tensor
    std: Tensor


def ablation_curve(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: LayerNames,
    num_orderings: int = 10,
    fractions: Tensor | None = None,
    value: AblationValue = "zero",
    generator: torch.Generator | None = None,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
    shortcut_path: ShortcutPath = "auto",
) -> AblationCurve:
    r"""Accuracy as units of ``layers`` are ablated cumulatively in random orders.

    Each of ``num_orderings`` random permutations of all :math:`U` units of the selected layers
    (pooled across layers) ablates its first :math:`m_k = \mathrm{round}(f_k U)` units at point
    :math:`k`; the accuracy on ``(inputs, targets)`` — in the paper the **training** set,
    corrupted labels included — is measured at each point, and

    .. math:: \mathrm{AUC} = \int_0^1 \overline{\mathrm{acc}}(f)\, df \quad(\text{trapezoid})

    Args:
        model: The classifier, in eval mode; its weights are not modified.
        inputs: ``[n, ...]`` probe inputs: a tensor (``model(x)``), a tuple (``model(*args)``)
            or a dict (``model(**kwargs)``, e.g. ``input_ids`` with ``attention_mask``) of
            tensors sharing axis 0.
        targets: ``[n]`` class indices, or ``[n, L]`` token ids for a language model with
            logits ``[n, L, V]`` (accuracy per token, ``-100`` ignored).
        layers: Names/globs of layers (see :mod:`~lightning_probes.core.interventions`);
            ``None``: the paper's default (:func:`default_ablation_layers`).
        num_orderings: Number of random orderings ``r``.
        fractions: ``[k]`` non-decreasing, from 0 to 1; default ``linspace(0, 1, 21)``.
        value: ``"zero"`` (the paper) or ``"mean"`` (each element's mean on the probe set).
        generator: Source of the orderings (default: the global RNG).
        follow_activation: Ablate the activation after each named layer.
        output_fn: Maps the model output to logits ``[n, o]``.
        memory_budget: Approximate bytes of activations per forward pass.
        shortcut_path: How the layer after the first point subtracts ablated units:
            ``"auto"``, ``"contributions"`` or ``"columns"``
            (:data:`~lightning_probes.core.interventions.shortcuts.ShortcutPath`); the same
            numbers up to float rounding.

    Returns:
        An :class:`AblationCurve`.

    Raises:
        ValueError: On invalid arguments (the message names the argument).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> curve = ablation_curve(net, x, y, layers=None, num_orderings=3)
        >>> curve.accuracy.shape, float(curve.fractions[-1])
        (torch.Size([3, 21]), 1.0)
    """
    from lightning_probes.functional.ablation import (
        ablation_counts,
        cumulative_keep_masks,
        curve_area,
        summarize_curves,
    )

    if not isinstance(num_orderings, int) or num_orderings < 1:
        raise ValueError(f"Expected `num_orderings` to be a positive int, got {num_orderings!r}.")
    if value not in ("zero", "mean"):
        raise ValueError(f"`value` can be 'zero' or 'mean', got {value!r}.")
    if shortcut_path not in ("auto", "contributions", "columns"):
        raise ValueError(
            f"`shortcut_path` can be 'auto', 'contributions' or 'columns', got {shortcut_path!r}."
        )
    _warn_if_training(model)
    trace = trace_model(model, inputs, layers, follow_activation, output_fn, targets)
    sizes = [p.num_units for p in trace.points]
    total = sum(sizes)
    fractions = torch.linspace(0, 1, 21, device="cpu") if fractions is None else fractions
    counts = ablation_counts(fractions, total)
    if counts[0] != 0 or counts[-1] != total:
        raise ValueError(
            f"Expected `fractions` to run from 0 to 1 (the AUC is over [0, 1]), got "
            f"{fractions.tolist()}."
        )
    orderings = torch.stack(
        [torch.randperm(total, generator=generator, device="cpu") for _ in range(num_orderings)]
    )
    keep = cumulative_keep_masks(orderings, counts).flatten(0, 1)  # [r*k, U], ordering-major
    unique, inverse = _dedupe(keep)
    masks = build_masks(model, inputs, trace, unique, value)
    acc, _ = evaluate_interventions(
        model,
        inputs,
        targets,
        trace,
        unique.shape[0],
        masks,
        masks=masks,
        output_fn=output_fn,
        memory_budget=memory_budget,
        shortcut_path=shortcut_path,
    )
    accuracy = acc[inverse].view(num_orderings, -1)
    mean, std = summarize_curves(accuracy)
    x = counts.to(torch.float64) / total
    auc = curve_area(x, mean)
    return AblationCurve(
        fractions=x,
        counts=counts,
        accuracy=accuracy,
        mean=mean,
        std=std,
        auc=auc,
        normalized_auc=auc / mean[0] if mean[0] > 0 else torch.tensor(float("nan"), device="cpu"),
        orderings=orderings,
        num_units={p.layer: p.num_units for p in trace.points},
        paths=dict(trace.paths),
    )


def noise_curve(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: LayerNames,
    scales: Tensor | None = None,
    num_repeats: int = 5,
    generator: torch.Generator | None = None,
    follow_activation: bool = True,
    output_fn: OutputFn | None = None,
    memory_budget: int = 2**25,
) -> NoiseCurve:
    r"""Accuracy with Gaussian noise on every unit of ``layers`` (Morcos et al., 2018, sec. 2.2).

    .. math:: \tilde h_{j} = h_{j} + s\, \sigma_j\, \varepsilon, \quad \varepsilon \sim N(0, 1)

    independently per sample and element, where :math:`\sigma_j` is unit :math:`j`'s std on
    the probe set (pooled over positions for feature maps) and :math:`s` the scale.

    Args:
        model: The classifier, in eval mode.
        inputs: ``[n, ...]`` probe inputs.
        targets: ``[n]`` class indices.
        layers: As in :func:`ablation_curve`.
        scales: ``[s]`` noise scales; default ``logspace(-2, 1, 7)`` (0.01 to 10).
        num_repeats: Noise draws per scale.
        generator: Source of the noise (a CPU generator; default: the global RNG).
        follow_activation: As in :func:`ablation_curve`.
        output_fn: Maps the model output to logits.
        memory_budget: Approximate bytes of activations per forward pass.

    Returns:
        A :class:`NoiseCurve`.
    """
    from lightning_probes.functional.ablation import summarize_curves

    if not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"Expected `num_repeats` to be a positive int, got {num_repeats!r}.")
    scales = (
        torch.logspace(-2, 1, 7, device="cpu")
        if scales is None
        else scales.detach().flatten().cpu()
    )
    if scales.numel() == 0 or bool((scales < 0).any()):
        raise ValueError(f"Expected `scales` to be non-negative values, got {scales.tolist()}.")
    _warn_if_training(model)
    trace = trace_model(model, inputs, layers, follow_activation, output_fn, targets)
    _, stds = point_statistics(model, inputs, trace)
    dtype = stds[0].dtype if stds else torch.float32
    per_mask = scales.repeat(num_repeats).to(device_of(inputs), dtype)  # [repeats*s]

    def add_noise(j: int, h: Tensor, sl: slice) -> Tensor:
        p = trace.points[j]
        sigma = unit_view(stds[j], h.ndim - 2, p.unit_dim)
        noise = torch.randn(h.shape, generator=generator, dtype=h.dtype, device="cpu").to(h.device)
        scale = per_mask[sl].view(-1, *([1] * (h.ndim - 1)))
        return h + scale * sigma * noise

    acc, _ = evaluate_interventions(
        model,
        inputs,
        targets,
        trace,
        per_mask.numel(),
        add_noise,
        output_fn=output_fn,
        memory_budget=memory_budget,
    )
    accuracy = acc.view(num_repeats, -1)
    mean, std = summarize_curves(accuracy)
    return NoiseCurve(scales=scales.to(torch.float64), accuracy=accuracy, mean=mean, std=std)


def _dedupe(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Unique rows in first-occurrence order (keeps each ordering's nesting) and the inverse."""
    seen: dict[bytes, int] = {}
    inverse: list[int] = []
    rows: list[Tensor] = []
    for row in keep:
        key = row.numpy().tobytes()
        if key not in seen:
            seen[key] = len(rows)
            rows.append(row)
        inverse.append(seen[key])
    return torch.stack(rows), torch.tensor(inverse, device="cpu")


def _warn_if_training(model: nn.Module) -> None:
    if model.training:
        warnings.warn(
            f"{type(model).__name__} is in training mode, so dropout and batch statistics make "
            "the ablation results noisy and batch-dependent. Call `model.eval()` first.",
            stacklevel=3,
        )
