r"""Trace one forward pass: ablation points, their order, shortcuts, memory per pass.

**Where a layer is ablated.** For each selected layer (a ``Linear``/HF ``Conv1D``/``Conv`` by
name) the intervention point is the activation module that consumes its output (skipping
normalisation, dropout and identity modules in between, e.g. ``Conv -> BatchNorm -> ReLU``;
``torch.nn`` and HF ``transformers.activations`` modules count), found by tracing one forward
pass; without one, the end of that chain (or the layer itself). Units lie on the layer type's
unit axis (the registry's): channels for conv, the last axis for linear-family layers, also
over sequences ``[n, T, d]``; every point must hold the samples on axis 0. To pick a point
explicitly, name that module (e.g. the ``ReLU``) in ``layers``, or pass
``follow_activation=False`` to intervene on exactly the named modules' outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.interventions.accuracy import check_targets
from lightning_probes.core.interventions.defaults import (
    choose_default_layers,
    sample_axes,
)
from lightning_probes.core.interventions.defaults import (
    default_ablation_layers as default_ablation_layers,  # re-exported
)
from lightning_probes.core.interventions.defaults import (
    has_module_of_type as has_module_of_type,  # re-exported
)
from lightning_probes.core.interventions.inputs import run, take
from lightning_probes.core.interventions.points import (
    AblationPoint,
    Call,
    find_shortcut,
    find_sparse_consumers,
    follow_to_activation,
    layer_unit_dim,
)
from lightning_probes.core.layers import LayerNames, select_layers


@dataclass
class Trace:
    """What :func:`trace_model` learned from one forward pass (see its docstring).

    Attributes:
        points: The ablation points, in selection (definition) order.
        order: Indices into ``points``, in execution order.
        prefix_elements: Largest per-sample output up to the first point (memory estimate).
        suffix_elements: Largest per-sample output from the first point on, logits included.
        shortcut: ``(name, layer)`` of the single ``Linear``/``Conv`` consuming the first point.
        sparse: ``{layer: (module, input point, point)}`` of layers computed for kept units only.
        element_size: Bytes per element of the first point's output (memory estimates).
        paths: How many forward passes of evaluations with this trace took each shortcut:
            ``"contributions"`` / ``"columns"`` (the first point's consumer, from all units'
            contributions or per newly ablated columns) and ``"sparse"`` (a sparse layer).
    """

    points: list[AblationPoint]
    order: list[int]
    prefix_elements: int
    suffix_elements: int
    shortcut: tuple[str, nn.Module] | None
    sparse: dict[str, tuple[nn.Module, int, int]]
    paths: dict[str, int] = field(default_factory=dict)
    element_size: int = 4

    def record(self, path: str) -> None:
        """Count one use of ``path`` (see :attr:`paths`)."""
        self.paths[path] = self.paths.get(path, 0) + 1


def trace_model(
    model: nn.Module,
    inputs: Any,
    layers: LayerNames,
    follow_activation: bool,
    output_fn: OutputFn | None = None,
    targets: Tensor | None = None,
) -> Trace:
    """Trace one forward pass on two samples: the points, their order and the shortcut.

    Each point's output must hold the samples on axis 0: that axis is found by permuting
    three samples (:func:`~lightning_probes.core.axes.find_sample_axes`), and a point found
    elsewhere (a sequence-first ``nn.TransformerEncoderLayer``'s ``linear1``) is refused.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` inputs: a tensor, or a tuple/dict of tensors sharing axis 0
            (only the first two/three samples are run).
        layers: Names or globs of modules; ``None``: the paper's default
            (:func:`choose_default_layers`).
        follow_activation: Move from a layer to the activation module after it.
        output_fn: Maps the model output to logits ``[n, o]`` (or ``[n, L, V]``).
        targets: If given, the logits' shape is checked against ``targets[:2]``
            (:func:`~lightning_probes.core.interventions.accuracy.check_targets`).

    Returns:
        A :class:`Trace`.

    Raises:
        ValueError: If a layer does not run exactly once, two layers share a point, a point's
            samples are not on axis 0, or the logits do not fit the targets.
        TypeError: If ``inputs`` or a point's output is not a tensor.
    """
    named = dict(model.named_modules())
    names = None if layers is None else list(select_layers(model, layers))
    watched = {
        k: m
        for k, m in named.items()
        if k and (not list(m.children()) or (names is not None and k in names))
    }
    calls: list[Call] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls.append((name, module, args[0] if args else None, out))

        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, m in watched.items()]
    try:
        with torch.enable_grad():
            logits = as_logits(run(model, take(inputs, 0, 2)), output_fn)
    finally:
        for handle in handles:
            handle.remove()
    if targets is not None:
        check_targets(logits, targets[:2])
    where: dict[str, list[int]] = {}
    for i, (name, _, _, _) in enumerate(calls):
        where.setdefault(name, []).append(i)
    if names is None:
        names = choose_default_layers(model, inputs, calls, where)
    points, positions = [], []
    for layer in names:
        if len(where.get(layer, [])) != 1:
            raise ValueError(
                f"Expected layer {layer!r} to run exactly once per forward pass, got "
                f"{len(where.get(layer, []))} calls. Select layers that are used once."
            )
        idx = where[layer][0]
        if follow_activation:
            idx = follow_to_activation(calls, idx, where)
        name, _, _, out = calls[idx]
        if not isinstance(out, Tensor) or out.ndim < 2:
            raise TypeError(
                f"Expected module {name!r} to return a Tensor [n, u, ...], got {out!r}."
            )
        unit_dim = layer_unit_dim(named[layer])
        points.append(AblationPoint(layer, name, named[name], unit_dim, int(out.shape[unit_dim])))
        positions.append(idx)
    if len({p.name for p in points}) < len(points):
        raise ValueError(
            f"Expected the layers {names} to resolve to distinct intervention points, got "
            f"{[p.name for p in points]}. Pass `follow_activation=False` or fewer layers."
        )
    _check_sample_axes(model, inputs, points)
    order = sorted(range(len(points)), key=lambda i: positions[i])
    first = positions[order[0]]
    sizes = [o[0].numel() if isinstance(o, Tensor) and o.ndim > 0 else 1 for *_, o in calls]
    shortcut = find_shortcut(calls, first, points[order[0]], logits, where)
    if shortcut is not None and shortcut[0] in {p.name for p in points}:
        shortcut = None
    suffix = max([*sizes[first:], logits[0].numel()])
    sparse = find_sparse_consumers(calls, points, positions, order, logits, where, shortcut)
    trace = Trace(points, order, max(sizes[: first + 1]), suffix, shortcut, sparse)
    trace.element_size = calls[first][3].element_size()
    return trace


def _check_sample_axes(model: nn.Module, inputs: Any, points: list[AblationPoint]) -> None:
    """Refuse points whose output holds the samples on an axis other than 0."""
    axes = sample_axes(model, inputs, {p.name: p.module for p in points})
    for p in points:
        axis = axes[p.name]
        if axis not in (None, 0):
            raise ValueError(
                f"Expected the output of {p.name!r} (the point of layer {p.layer!r}) to hold the "
                f"samples on axis 0, got axis {axis} (a sequence-first layer, e.g. "
                "nn.TransformerEncoderLayer(batch_first=False)). Ablation and selectivity need "
                "batch-first points: pass `layers=` naming batch-first layers, or build the "
                "model with `batch_first=True`."
            )
