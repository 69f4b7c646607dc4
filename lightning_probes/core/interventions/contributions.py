r"""Fast paths of the intervention engine: work per mask that can be skipped exactly.

Serves Morcos, Barrett, Rabinowitz, Botvinick, "On the importance of single directions for
generalization" (ICLR 2018), sec. 2.2: the cumulative ablation curves of
:mod:`lightning_probes.core.ablation` and the single-unit ablations of
:mod:`lightning_probes.core.selectivity`, evaluated by
:func:`~lightning_probes.core.interventions.evaluate_interventions`. Each path has a detector,
run by :func:`~lightning_probes.core.interventions.trace_model` on the traced forward pass
(``_find_shortcut``, ``_find_sparse_consumers``), and an executor, run from the engine's
forward hooks (``_shortcut``, ``_sparse_layer``). Both are exact up to float rounding:

- When the first point is consumed by a single ``Linear``/``Conv`` (checked on the autograd
  graph), that map is not re-run per mask:
  :math:`W(h \odot k + v \odot (1-k)) + b = z - W((h - v) \odot (1-k))`. The contribution of
  each unit, :math:`P_c = W_{\cdot c} (h - v)_c`, is computed once (one grouped convolution)
  and a mask that ablates a superset of the previous mask's units (the next point of one
  cumulative ordering) adds only the new units' :math:`P_c`: a cumulative sum along the
  ordering. (If the :math:`P_c` do not fit in half the budget, ``W`` is applied to the new
  units' columns instead.)
- When a later point's own layer reads exactly the previous point's output and reaches its
  point only through channel-wise modules (``BatchNorm``, dropout, identity, an elementwise
  activation), that layer runs on an empty batch and is computed per mask for the units kept
  at its point only, from the inputs kept at the previous point (zero ablation); the outputs
  it skips are overwritten by the point's ablation anyway. Masks that keep most of the work
  run as one dense batch.

This module imports nothing from :mod:`~lightning_probes.core.interventions` at run time (its
types only for type checking), so that module can import it without a cycle.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_probes.core.interventions.engine import AblationPoint, Masks

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish,
    nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Threshold,
)  # fmt: skip
_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Identity)
_Call = tuple[str, nn.Module, Any, Any]  # (name, module, first input, output) of one call


# ------------------------------------------------------------ detection (at trace time)
def _find_sparse_consumers(
    calls: list[_Call],
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
    the units kept at ``i`` (the others are 0 when ablated to 0).
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
        linear_ok = isinstance(module, nn.Linear) and (points[i].unit_dim == -1 or source.ndim == 2)
        conv_ok = isinstance(module, CONV_TYPES) and module.groups == 1 and points[i].unit_dim == 1
        if not (linear_ok or conv_ok):
            continue
        chain_ok, current = True, out
        for k in range(idx + 1, positions[j] + 1):  # L -> (BatchNorm, ...) -> activation
            _, mod, a, o = calls[k]
            if a is not current:
                continue
            last = k == positions[j]
            allowed = _ELEMENTWISE + _CHANNELWISE if last else _CHANNELWISE
            uses = _graph_uses(logits.grad_fn, current.grad_fn) if current.grad_fn else 0
            if not isinstance(mod, allowed) or uses != 1:
                chain_ok = False
                break
            current = o
        if chain_ok and current is calls[positions[j]][3]:
            found[layer] = (module, i, j)
    return found


def _find_shortcut(
    calls: list[_Call],
    idx: int,
    point: AblationPoint,
    logits: Tensor,
    where: dict[str, list[int]],
) -> tuple[str, nn.Module] | None:
    """The single ``Linear``/``Conv`` (groups=1) whose input is the first point's output."""
    h = calls[idx][3]
    if not isinstance(h, Tensor) or h.grad_fn is None or logits.grad_fn is None:
        return None
    consumers = [j for j in range(idx + 1, len(calls)) if calls[j][2] is h]
    if len(consumers) != 1 or len(where[calls[consumers[0]][0]]) != 1:
        return None
    name, module = calls[consumers[0]][0], calls[consumers[0]][1]
    linear_ok = isinstance(module, nn.Linear) and (point.unit_dim == -1 or h.ndim == 2)
    conv_ok = isinstance(module, CONV_TYPES) and module.groups == 1 and point.unit_dim == 1
    if not (linear_ok or conv_ok) or _graph_uses(logits.grad_fn, h.grad_fn) != 1:
        return None
    return name, module


def _graph_uses(root: Any, target: Any) -> int:
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


# ------------------------------------------------------------- execution (per forward pass)
def _sparse_layer(
    layer: nn.Module,
    x: Tensor,
    sample_shape: torch.Size,
    masks: Masks,
    i: int,
    j: int,
    sl: slice,
    density: float = 0.5,
) -> Tensor:
    """``layer`` on ``x`` ``[m * n, ...]`` for outputs kept at point ``j``; others are 0.

    Input units ablated to 0 at point ``i`` are left out of the sum. Masks that keep more than
    ``density`` of the work run together as one batch on all units instead.
    """
    weight: Tensor = layer.weight  # type: ignore[assignment]
    bias: Tensor | None = layer.bias  # type: ignore[assignment]
    linear = isinstance(layer, nn.Linear)
    m = sl.stop - sl.start
    xs = x.view(m, -1, *x.shape[1:])
    out = x.new_zeros(m, xs.shape[1], *sample_shape)
    keep_out = masks.keep[j][sl]
    keep_in = masks.keep[i][sl] if masks.values[i] is None else None
    share = keep_out.sum(1) / keep_out.shape[1]
    if keep_in is not None:
        share = share * keep_in.sum(1) / keep_in.shape[1]

    def run(inputs: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if linear:
            return nn.functional.linear(inputs, w, b)
        return layer._conv_forward(inputs, w, b)  # type: ignore[operator]

    dense = (share > density).cpu()
    if bool(dense.any()):
        rows = dense.nonzero().squeeze(1).to(x.device)
        full = run(xs.index_select(0, rows).flatten(0, 1), weight, bias)
        out.index_copy_(0, rows, full.view(rows.numel(), *out.shape[1:]))
    out_dim, in_dim = (out.ndim - 2, x.ndim - 1) if linear else (1, 1)
    for t in (~dense).nonzero().squeeze(1).tolist():
        kept = keep_out[t].nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        w, b = weight.index_select(0, kept), None if bias is None else bias.index_select(0, kept)
        inputs = xs[t]
        if keep_in is not None:
            used = keep_in[t].nonzero().squeeze(1)
            if used.numel() == 0:  # all inputs are 0: the output is the bias
                if b is not None:
                    shape, view = list(out[t].shape), [1] * (out.ndim - 1)
                    shape[out_dim], view[out_dim] = kept.numel(), -1
                    out[t].index_copy_(out_dim, kept, b.view(view).expand(shape).contiguous())
                continue
            inputs, w = inputs.index_select(in_dim, used), w.index_select(1, used)
        out[t].index_copy_(out_dim, kept, run(inputs, w, b))
    return out.flatten(0, 1)


def _shortcut(
    layer: nn.Module,
    z: Tensor,
    h: Tensor,
    masks: Masks,
    j: int,
    point: AblationPoint,
    sl: slice,
    memory_budget: int,
    cache: dict[str, Tensor | None] | None = None,
) -> Tensor:
    r"""``[m, n, ...]`` outputs of ``layer`` for each mask: :math:`z - W((h - v) \odot (1-k))`.

    Successive masks whose ablated set grows reuse the previous correction and add only the
    contributions of the newly ablated units, so a whole cumulative ordering costs one pass of
    ``layer``. When they fit in half the memory budget, the contributions of all units are
    computed once (one grouped convolution) and each mask only sums rows of them (the
    cumulative sum along an ordering); otherwise ``layer`` is applied to the new units' columns.
    """
    value = masks.values[j]
    d = h if value is None else h - value
    dim = 1 if point.unit_dim == 1 else h.ndim - 1
    keep = masks.keep[j][sl].cpu()
    cache = {} if cache is None else cache  # the same samples for every chunk of masks
    if "per_unit" not in cache:
        fits = keep.shape[1] * z.numel() * z.element_size() <= memory_budget // 2
        cache["per_unit"] = _unit_contributions(layer, d, z.shape[2:]) if fits else None
    per_unit = cache["per_unit"]
    out = z.new_empty(keep.shape[0], *z.shape)
    previous, delta = None, None
    for i, row in enumerate(keep):
        ablated = ~row
        if previous is not None and not bool((previous & row).any()):
            new = ablated & ~previous
        else:
            new, delta = ablated, None
        idx = new.nonzero().squeeze(1).to(h.device)
        if idx.numel():
            if per_unit is not None:
                part = per_unit.index_select(0, idx).sum(0)
            else:
                part = _partial_map(layer, d.index_select(dim, idx), idx)
            delta = part if delta is None else delta + part
        if delta is None:
            out[i] = z
        else:
            torch.sub(z, delta, out=out[i])
        previous = ablated
    return out


def _unit_contributions(layer: nn.Module, d: Tensor, out_shape: torch.Size) -> Tensor:
    r"""``[u, n, ...]``: ``layer``'s linear part (no bias) applied to each input unit alone.

    For a ``Linear`` :math:`P_c = d_{\cdot c} W_{\cdot c}^\top`; for a convolution
    :math:`P_c = W_{\cdot c} * d_c`, all channels in one convolution with ``groups = u``
    (or, for ``Conv2d``, one batched matmul over the unfolded input). ``out_shape``: the
    spatial shape of the layer's output.
    """
    weight: Tensor = layer.weight  # type: ignore[assignment]
    if isinstance(layer, nn.Linear):
        u, o = weight.shape[1], weight.shape[0]
        w = weight.t().reshape(u, *([1] * (d.ndim - 1)), o)
        return d.movedim(-1, 0).unsqueeze(-1) * w
    assert isinstance(layer, CONV_TYPES)
    c_out, u = weight.shape[:2]
    pad = layer.padding
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros" and isinstance(pad, tuple):
        # im2col and one batched matmul: faster than the grouped convolution below
        kernel, n = weight.shape[2:], d.shape[0]
        cols = nn.functional.unfold(d, kernel, layer.dilation, pad, layer.stride)
        cols = cols.view(n, u, kernel.numel(), -1).transpose(0, 1)  # [u, n, k, L]
        p = torch.matmul(weight.transpose(0, 1).reshape(u, 1, c_out, -1), cols)
        return p.view(u, n, c_out, *out_shape)
    grouped = weight.transpose(0, 1).reshape(u * c_out, 1, *weight.shape[2:])
    conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[d.ndim - 3]
    padding: Any = layer.padding
    if layer.padding_mode != "zeros":
        d = nn.functional.pad(d, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = 0
    out = conv(d, grouped, None, layer.stride, padding, layer.dilation, u)
    return out.view(out.shape[0], u, c_out, *out.shape[2:]).movedim(1, 0).contiguous()


def _partial_map(layer: nn.Module, d: Tensor, idx: Tensor) -> Tensor:
    """``layer``'s linear part (no bias) applied to the input columns/channels ``idx``."""
    weight = layer.weight.index_select(1, idx)  # type: ignore[operator]
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(d, weight)
    return layer._conv_forward(d, weight, None)  # type: ignore[operator]
