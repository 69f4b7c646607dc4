r"""Trace one forward pass: ablation points, their order, shortcuts, memory per pass.

**Where a layer is ablated.** For each selected layer (a ``Linear``/``Conv`` by name) the
intervention point is the activation module that consumes its output (skipping normalisation,
dropout and identity modules in between, e.g. ``Conv -> BatchNorm -> ReLU``), found by tracing
one forward pass; without one, the end of that chain (or the layer itself). To pick a point
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
from lightning_probes.core.interventions.points import (
    AblationPoint,
    Call,
    find_shortcut,
    find_sparse_consumers,
    follow_to_activation,
    layer_unit_dim,
)
from lightning_probes.core.layers import LayerNames, select_layers
from lightning_probes.core.modules import CONV_TYPES


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

    def record(self, path: str) -> None:
        """Count one use of ``path`` (see :attr:`paths`)."""
        self.paths[path] = self.paths.get(path, 0) + 1


def has_module_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """Whether any submodule of ``model`` (itself included) is an instance of ``types``."""
    return any(isinstance(m, types) for m in model.modules())


def default_ablation_layers(model: nn.Module) -> list[str]:
    """The paper's default: conv nets the last three conv layers, MLPs all hidden layers.

    Raises:
        ValueError: If the model has neither conv layers nor at least two ``Linear`` layers.
    """
    convs = (
        list(select_layers(model, types=CONV_TYPES))
        if has_module_of_type(model, CONV_TYPES)
        else []
    )
    if convs:
        return convs[-3:]
    linears = (
        list(select_layers(model, types=nn.Linear))
        if has_module_of_type(model, (nn.Linear,))
        else []
    )
    if len(linears) < 2:
        raise ValueError(
            f"Expected {type(model).__name__} to have conv layers or at least two Linear layers "
            "(hidden + output) to choose default ablation layers, got none. Pass `layers=`."
        )
    return linears[:-1]


def trace_model(
    model: nn.Module,
    inputs: Tensor,
    layers: LayerNames,
    follow_activation: bool,
    output_fn: OutputFn | None = None,
) -> Trace:
    """Trace one forward pass on two samples: the points, their order and the shortcut.

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` inputs (only the first two are run).
        layers: Names or globs of modules; ``None``: the paper's default
            (:func:`default_ablation_layers`).
        follow_activation: Move from a layer to the activation module after it.
        output_fn: Maps the model output to logits ``[n, o]``.

    Returns:
        A :class:`Trace`.

    Raises:
        ValueError: If a layer does not run exactly once, or two layers share a point.
        TypeError: If ``inputs`` or a point's output is not a tensor.
    """
    if not isinstance(inputs, Tensor):
        raise TypeError(f"Expected `inputs` to be a Tensor [n, ...], got {type(inputs).__name__}.")
    names = default_ablation_layers(model) if layers is None else list(select_layers(model, layers))
    named = dict(model.named_modules())
    watched = {n: m for n, m in named.items() if n and (not list(m.children()) or n in names)}
    calls: list[Call] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            calls.append((name, module, args[0] if args else None, out))

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in watched.items()]
    try:
        with torch.enable_grad():
            logits = as_logits(model(inputs[:2]), output_fn)
    finally:
        for handle in handles:
            handle.remove()
    where: dict[str, list[int]] = {}
    for i, (name, _, _, _) in enumerate(calls):
        where.setdefault(name, []).append(i)
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
    order = sorted(range(len(points)), key=lambda i: positions[i])
    first = positions[order[0]]
    sizes = [o[0].numel() if isinstance(o, Tensor) and o.ndim > 0 else 1 for *_, o in calls]
    shortcut = find_shortcut(calls, first, points[order[0]], logits, where)
    if shortcut is not None and shortcut[0] in {p.name for p in points}:
        shortcut = None
    suffix = max([*sizes[first:], logits[0].numel()])
    sparse = find_sparse_consumers(calls, points, positions, order, logits, where, shortcut)
    return Trace(points, order, max(sizes[: first + 1]), suffix, shortcut, sparse)
