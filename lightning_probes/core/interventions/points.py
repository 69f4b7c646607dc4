r"""Where units live: ablation points, and what the traced forward pass says about them.

A *unit* is one feature of a fully connected layer's output or one whole feature map (channel)
of a convolutional layer's output (the axis is the layer type's
:attr:`~lightning_probes.core.modules.LayerOps.unit_dim`). For each selected layer the
intervention point is the activation module that consumes its output, past the modules that
keep the unit layout (:attr:`~lightning_probes.core.modules.LayerOps.passes_units`:
normalisation, dropout, identity), e.g. ``Conv -> BatchNorm -> ReLU``.

The detectors of the engine's two shortcuts run here on the traced calls
(:func:`find_shortcut`, :func:`find_sparse_consumers`); their executors are in
:mod:`lightning_probes.core.interventions.shortcuts`. Morcos, Barrett, Rabinowitz, Botvinick,
"On the importance of single directions for generalization" (ICLR 2018), sec. 2.2.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_probes.core.modules import ops_for

Call = tuple[str, nn.Module, Any, Any]
"""``(name, module, first input, output)`` of one module call in the traced forward pass."""

_NOT_ACTIVATIONS = (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention)


@dataclass(frozen=True)
class AblationPoint:
    """Where a selected layer's units are intervened on.

    Attributes:
        layer: The selected layer's name (the key used in results).
        name: Name of the module whose output is replaced (the activation after ``layer``).
        module: That module.
        unit_dim: Dimension of the output that indexes units: 1 (channels, or the features of
            a ``[n, u]`` output) or -1 (features of a ``Linear`` applied to ``[n, ..., u]``).
        num_units: Number of units.
    """

    layer: str
    name: str
    module: nn.Module
    unit_dim: int
    num_units: int


def layer_unit_dim(module: nn.Module) -> int:
    """The unit axis of ``module``'s output (its registry entry's; 1 for unknown layers)."""
    ops = ops_for(module)
    return 1 if ops is None else ops.unit_dim


def follow_to_activation(calls: list[Call], idx: int, where: dict[str, list[int]]) -> int:
    """From a layer's call, walk to the activation that consumes its output (if any).

    Modules that keep the unit layout are passed; the walk stops at the first other consumer,
    which is the point if the registry knows it as an elementwise activation
    (:attr:`~lightning_probes.core.modules.LayerOps.activation`: ``torch.nn`` activations, HF
    ``transformers.activations``; softmax and attention are not).
    """
    current = calls[idx][3]
    for j in range(idx + 1, len(calls)):
        name, module, arg, out = calls[j]
        if arg is not current:
            continue
        if len(where[name]) != 1:
            return idx
        ops = ops_for(module)
        if ops is not None and ops.passes_units:
            idx, current = j, out
            continue
        if ops is not None and ops.activation and not isinstance(module, _NOT_ACTIVATIONS):
            return j
        return idx
    return idx


# ------------------------------------------------------------ shortcut detection
def find_sparse_consumers(
    calls: list[Call],
    points: list[AblationPoint],
    positions: list[int],
    order: list[int],
    logits: Tensor,
    where: dict[str, list[int]],
    shortcut: tuple[str, nn.Module] | None,
) -> dict[str, tuple[nn.Module, int, int]]:
    """Points whose own layer reads exactly the previous point's output, channel-wise after.

    For such a point ``j`` (layer ``L``, previous point ``i``), ``L`` only needs the units kept
    at ``j`` (its other outputs reach nothing but ``j``, which overwrites them), computed from
    the units kept at ``i`` (the others are 0 when ablated to 0). Between ``L`` and ``j`` only
    :attr:`~lightning_probes.core.modules.LayerOps.channelwise` modules may run, and ``j``
    itself may be an elementwise
    :attr:`~lightning_probes.core.modules.LayerOps.activation`.

    Returns:
        ``{layer name: (layer, previous point index, point index)}``.
    """
    found: dict[str, tuple[nn.Module, int, int]] = {}
    if logits.grad_fn is None:
        return found
    for i, j in itertools.pairwise(order):
        layer = points[j].layer
        idx = where[layer][0]
        _, module, arg, out = calls[idx]
        source = calls[positions[i]][3]
        if arg is not source or (shortcut is not None and layer == shortcut[0]):
            continue
        ops = ops_for(module)
        if ops is None or not ops.accepts_units(module, points[i].unit_dim, source.ndim):
            continue
        chain_ok, current = True, out
        for k in range(idx + 1, positions[j] + 1):  # L -> (BatchNorm, ...) -> activation
            _, mod, a, o = calls[k]
            if a is not current:
                continue
            last = k == positions[j]
            step = ops_for(mod)
            allowed = step is not None and (step.channelwise or (last and step.activation))
            uses = graph_uses(logits.grad_fn, current.grad_fn) if current.grad_fn else 0
            if not allowed or uses != 1:
                chain_ok = False
                break
            current = o
        if chain_ok and current is calls[positions[j]][3]:
            found[layer] = (module, i, j)
    return found


def find_shortcut(
    calls: list[Call],
    idx: int,
    point: AblationPoint,
    logits: Tensor,
    where: dict[str, list[int]],
) -> tuple[str, nn.Module] | None:
    """The single layer whose input is the first point's output, if it separates units.

    Its linear part must separate over that point's units
    (:meth:`~lightning_probes.core.modules.LayerOps.accepts_units`: a ``Linear``, a ``Conv``
    with one group).
    """
    h = calls[idx][3]
    if not isinstance(h, Tensor) or h.grad_fn is None or logits.grad_fn is None:
        return None
    consumers = [j for j in range(idx + 1, len(calls)) if calls[j][2] is h]
    if len(consumers) != 1 or len(where[calls[consumers[0]][0]]) != 1:
        return None
    name, module = calls[consumers[0]][0], calls[consumers[0]][1]
    ops = ops_for(module)
    if ops is None or not ops.accepts_units(module, point.unit_dim, h.ndim):
        return None
    if graph_uses(logits.grad_fn, h.grad_fn) != 1:
        return None
    return name, module


def graph_uses(root: Any, target: Any) -> int:
    """Number of autograd edges into ``target`` reachable from ``root`` (its consumers)."""
    uses, seen, stack = 0, set(), [root]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            uses += nxt is target
            stack.append(nxt)
    return uses
