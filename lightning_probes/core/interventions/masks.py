r"""Ablation masks: which units each intervention keeps, and the values ablated units take.

Morcos et al. (ICLR 2018), sec. 2.2: ablating a unit clamps its post-nonlinearity activity to
a fixed value, 0 by default or the unit's mean over the probe set (``value="mean"``, the
paper's appendix A.1 comparison).

Index letters: ``M`` masks, ``n`` samples, ``u`` units of a point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.hooks import replace_output
from lightning_probes.core.interventions.inputs import device_of, num_samples, run, take
from lightning_probes.core.interventions.trace import Trace
from lightning_probes.core.modules import unit_axis


@dataclass
class Masks:
    """Ablation masks for :func:`evaluate_interventions`.

    Attributes:
        keep: One ``[M, u]`` bool tensor per point (``True``: the unit is kept).
        values: One tensor per point shaped like one sample's output (the value ablated units
            are clamped to), or ``None`` for 0.
        unit_dims: Each point's :attr:`AblationPoint.unit_dim`.
    """

    keep: list[Tensor]
    values: list[Tensor | None]
    unit_dims: list[int]

    def __call__(self, j: int, h: Tensor, masks: slice) -> Tensor:
        """Clamp point ``j``'s ablated units in ``h`` ``[m, n, ...]`` for masks ``masks``."""
        keep = unit_view(self.keep[j][masks], h.ndim - 2, self.unit_dims[j], leading=1)
        value = self.values[j]
        if sum_is_finite(h) and (value is None or sum_is_finite(value)):
            # h * 1 = h and h * 0 = 0 exactly (up to the sign of 0); faster than `where`
            k = keep.unsqueeze(1).to(h.dtype)
            return h * k if value is None else h * k + value * (1 - k)
        return torch.where(keep.unsqueeze(1), h, 0.0 if value is None else value)


def build_masks(
    model: nn.Module, inputs: Any, trace: Trace, keep: Tensor, value: str = "zero"
) -> Masks:
    """:class:`Masks` from one ``[M, U]`` keep matrix over all units of ``trace``'s points.

    Args:
        model: The network (for the unit means when ``value="mean"``).
        inputs: The probe inputs ``[n, ...]`` (a tensor, or a tuple/dict of tensors).
        trace: The traced ablation points (their units, in order, make the ``U`` columns).
        keep: ``[M, U]`` bool, ``True`` where a unit is kept in mask ``m``.
        value: ``"zero"`` clamps ablated units to 0, ``"mean"`` to their mean on ``inputs``.
    """
    sizes = [p.num_units for p in trace.points]
    values: list[Tensor | None] = [None] * len(sizes)
    if value == "mean":
        values = list(point_statistics(model, inputs, trace)[0])
    return Masks(
        [k.to(device_of(inputs)) for k in keep.split(sizes, dim=1)],
        values,
        [p.unit_dim for p in trace.points],
    )


def sum_is_finite(t: Tensor) -> bool:
    """Whether the sum of ``t`` is finite: one pass, no boolean copy.

    A finite sum implies that every element is finite; a sum that overflows (all elements
    finite) only sends the caller to its exact path, so this is a fast, conservative test
    for "every element is finite", not the same as ``torch.isfinite(t).all()``.
    """
    return bool(t.sum().isfinite())


def unit_view(vec: Tensor, sample_ndim: int, unit_dim: int, leading: int = 0) -> Tensor:
    """Reshape ``[..., u]`` (``leading`` dims kept) to broadcast against ``[..., *sample]``."""
    pos = unit_dim - 1 if unit_dim > 0 else sample_ndim + unit_dim
    shape = [1] * sample_ndim
    shape[pos] = vec.shape[-1]
    return vec.reshape(*vec.shape[:leading], *shape)


def point_statistics(
    model: nn.Module, inputs: Any, trace: Trace, *, chunk_size: int = 1024
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-element mean (one sample's shape) and per-unit std of each point's output.

    The std pools samples and, for feature maps and sequences, positions (the unit's std over
    the probe set). Accumulated in float64; returned in each point's output dtype.
    """
    k = len(trace.points)
    sums: list[Tensor] = [torch.zeros((), device="cpu")] * k  # moved to the outputs' device
    moments: list[Tensor] = [torch.zeros((), device="cpu")] * k  # [2, u]: sums of x and x²
    index = {p.name: j for j, p in enumerate(trace.points)}
    dtypes: list[torch.dtype] = [torch.float32] * k

    def record(name: str, out: Tensor) -> Tensor:
        j = index[name]
        dtypes[j] = out.dtype
        o = out.detach().to(torch.float64)
        sums[j] = sums[j].to(o.device) + o.sum(0)
        dim = unit_axis(trace.points[j].unit_dim, o.ndim)
        flat = o.movedim(dim, 0).flatten(1)
        moments[j] = moments[j].to(o.device) + torch.stack([flat.sum(1), (flat * flat).sum(1)])
        return out

    n = num_samples(inputs)
    with torch.no_grad(), replace_output({p.name: p.module for p in trace.points}, record):
        for s0 in range(0, n, chunk_size):
            run(model, take(inputs, s0, s0 + chunk_size))
    means, stds = [], []
    for j, p in enumerate(trace.points):
        count = n * (sums[j].numel() // p.num_units)
        mu = moments[j][0] / count
        var = (moments[j][1] / count - mu * mu).clamp_min(0.0)
        means.append((sums[j] / n).to(dtypes[j]))
        stds.append(var.sqrt().to(dtypes[j]))
    return means, stds
