r"""Fast paths of the intervention engine: work per mask that can be skipped exactly.

Serves Morcos, Barrett, Rabinowitz, Botvinick, "On the importance of single directions for
generalization" (ICLR 2018), sec. 2.2: the cumulative ablation curves of
:mod:`lightning_probes.core.interventions.ablation` and the single-unit ablations of
:mod:`lightning_probes.core.interventions.selectivity`, evaluated by
:func:`~lightning_probes.core.interventions.engine.evaluate_interventions`. Each path has a
detector, run by :func:`~lightning_probes.core.interventions.trace.trace_model` on the traced
forward pass (:func:`~lightning_probes.core.interventions.points.find_shortcut`,
:func:`~lightning_probes.core.interventions.points.find_sparse_consumers`), and an executor
here, run from the engine's forward hooks (:func:`shortcut_outputs`, :func:`sparse_layer`). Both are
exact up to float rounding; the layer's own computations come from its registry entry
(:mod:`lightning_probes.core.modules`):

- When the first point is consumed by a single ``Linear``/``Conv`` (checked on the autograd
  graph), that map is not re-run per mask:
  :math:`W(h \odot k + v \odot (1-k)) + b = z - W((h - v) \odot (1-k))`. The contribution of
  each unit, :math:`P_c = W_{\cdot c} (h - v)_c`, is computed once (one grouped convolution)
  and a mask that ablates a superset of the previous mask's units (the next point of one
  cumulative ordering) adds only the new units' :math:`P_c`: a cumulative sum along the
  ordering (``"contributions"``). (If the :math:`P_c` do not fit in half the budget, ``W`` is
  applied to the new units' columns instead: ``"columns"``.)
- When a later point's own layer reads exactly the previous point's output and reaches its
  point only through channel-wise modules (``BatchNorm``, dropout, identity, an elementwise
  activation), that layer runs on an empty batch and is computed per mask for the units kept
  at its point only, from the inputs kept at the previous point (zero ablation); the outputs
  it skips are overwritten by the point's ablation anyway. Masks that keep most of the work
  run as one dense batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_probes.core.interventions.masks import Masks
from lightning_probes.core.interventions.points import AblationPoint
from lightning_probes.core.modules import LayerOps, ops_for, unit_axis

ShortcutPath = Literal["auto", "contributions", "columns"]
"""How :func:`shortcut_outputs` subtracts the ablated units: all units' contributions computed once
(``"contributions"``), the layer applied to the newly ablated columns (``"columns"``), or
``"auto"``: contributions when they fit in half the memory budget, else columns."""


def _ops(layer: nn.Module) -> LayerOps:
    ops = ops_for(layer)
    assert ops is not None  # the detectors only accept registered layers
    return ops


def sparse_layer(
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
    ops = _ops(layer)
    weight: Tensor = layer.weight  # type: ignore[assignment]
    bias: Tensor | None = layer.bias  # type: ignore[assignment]
    m = sl.stop - sl.start
    xs = x.view(m, -1, *x.shape[1:])
    out = x.new_zeros(m, xs.shape[1], *sample_shape)
    keep_out = masks.keep[j][sl]
    keep_in = masks.keep[i][sl] if masks.values[i] is None else None
    share = keep_out.sum(1) / keep_out.shape[1]
    if keep_in is not None:
        share = share * keep_in.sum(1) / keep_in.shape[1]

    dense = (share > density).cpu()
    if bool(dense.any()):
        rows = dense.nonzero().squeeze(1).to(x.device)
        full = ops.apply(layer, xs.index_select(0, rows).flatten(0, 1), weight, bias)
        out.index_copy_(0, rows, full.view(rows.numel(), *out.shape[1:]))
    out_dim, in_dim = unit_axis(ops.unit_dim, out.ndim - 1), unit_axis(ops.unit_dim, x.ndim)
    for t in (~dense).nonzero().squeeze(1).tolist():
        kept = keep_out[t].nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        w, b = (
            ops.select_outputs(weight, kept),
            None if bias is None else bias.index_select(0, kept),
        )
        inputs = xs[t]
        if keep_in is not None:
            used = keep_in[t].nonzero().squeeze(1)
            if used.numel() == 0:  # all inputs are 0: the output is the bias
                if b is not None:
                    shape, view = list(out[t].shape), [1] * (out.ndim - 1)
                    shape[out_dim], view[out_dim] = kept.numel(), -1
                    out[t].index_copy_(out_dim, kept, b.view(view).expand(shape).contiguous())
                continue
            inputs, w = inputs.index_select(in_dim, used), ops.select_inputs(w, used)
        out[t].index_copy_(out_dim, kept, ops.apply(layer, inputs, w, b))
    return out.flatten(0, 1)


def shortcut_outputs(
    layer: nn.Module,
    z: Tensor,
    h: Tensor,
    masks: Masks,
    j: int,
    point: AblationPoint,
    sl: slice,
    memory_budget: int,
    cache: dict[str, Tensor | None] | None = None,
    path: ShortcutPath = "auto",
) -> Tensor:
    r"""``[m, n, ...]`` outputs of ``layer`` for each mask: :math:`z - W((h - v) \odot (1-k))`.

    Successive masks whose ablated set grows reuse the previous correction and add only the
    contributions of the newly ablated units, so a whole cumulative ordering costs one pass of
    ``layer``. With ``path="contributions"`` (by default when they fit in half the memory
    budget) the contributions of all units are computed once (one grouped convolution) and
    each mask only sums rows of them (the cumulative sum along an ordering); with
    ``"columns"``, ``layer`` is applied to the new units' columns.
    """
    ops = _ops(layer)
    value = masks.values[j]
    d = h if value is None else h - value
    dim = unit_axis(point.unit_dim, h.ndim)
    keep = masks.keep[j][sl].cpu()
    cache = {} if cache is None else cache  # the same samples for every chunk of masks
    if "per_unit" not in cache:
        fits = keep.shape[1] * z.numel() * z.element_size() <= memory_budget // 2
        use = path == "contributions" or (path == "auto" and fits)
        cache["per_unit"] = ops.unit_contributions(layer, d, z.shape[2:]) if use else None
    per_unit = cache["per_unit"]
    weight: Tensor = layer.weight  # type: ignore[assignment]
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
            else:  # the layer's linear part (no bias) on the columns/channels idx
                part = ops.apply(
                    layer, d.index_select(dim, idx), ops.select_inputs(weight, idx), None
                )
            delta = part if delta is None else delta + part
        if delta is None:
            out[i] = z
        else:
            torch.sub(z, delta, out=out[i])
        previous = ablated
    return out
