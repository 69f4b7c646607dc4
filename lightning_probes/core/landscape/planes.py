r"""Loss on planes and paths through weight space, many points per forward (``vmap``).

The measurements of Fort & Jastrzebski, "Large Scale Structure of Neural Network Loss
Landscapes" (NeurIPS 2019) on a real network: the loss on a 2-D plane through the current
weights spanned by the radial direction :math:`\theta` and a random direction (the "radial
tunnel": training moves mostly outwards and every random 2-D cut shows a convex depression
around the current point), on a plane of two random directions (Li et al. 2018), and along a
polygonal chain between parameter sets (low-loss connectors; averaging checkpoints that lie
on different wedges fails). The model's weights are never written. Planes and paths are
affine families of weights; for a chain of known layers they are evaluated exactly by
:func:`~lightning_probes.core.landscape.affine.affine_family_loss` (the first layer the
directions move is linear in its weights, so it is computed once per direction; per-point
``bmm`` after it); any other model falls back to :func:`torch.func.vmap` over a stack of
parameter sets with :func:`torch.func.functional_call`, chunked to a memory budget.

Parameters are ``{name: tensor}`` dicts (:data:`Params`); a *stack* holds ``m`` points as
``{name: [m, *shape]}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from lightning_probes.core.data import ProbeSet, model_arguments, slice_rows
from lightning_probes.core.evaluation import LossFn, OutputFn, chunks, probe_loss
from lightning_probes.core.landscape.affine import affine_family_loss
from lightning_probes.functional.landscape import OneDimPolicy, filter_normalize

Params = dict[str, Tensor]


@dataclass
class LossPlane:
    """Loss on a grid ``center + a * u + b * v``.

    Attributes:
        alphas: ``[A]`` coordinates along ``u``.
        betas: ``[B]`` coordinates along ``v``.
        losses: ``[B, A]`` loss at ``(betas[i], alphas[j])`` (rows: ``v``, columns: ``u``).
    """

    alphas: Tensor
    betas: Tensor
    losses: Tensor


def trainable_parameters(model: nn.Module) -> Params:
    """``{name: detached parameter}`` for every parameter with ``requires_grad``."""
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a parameter dict into one flat vector (in the dict's order)."""
    return torch.cat([p.reshape(-1) for p in params.values()])


def random_direction(
    params: Mapping[str, Tensor],
    *,
    generator: torch.Generator | None = None,
    normalization: str = "filter",
    one_dim: OneDimPolicy = "zero",
) -> Params:
    r"""A Gaussian direction, filter-normalised to the weights (Li et al. 2018).

    Args:
        params: The weights the direction perturbs.
        generator: CPU generator for reproducible draws (the direction is drawn on the CPU in
            float32 and moved to each parameter's device and dtype).
        normalization: ``"filter"`` (per output row/filter, see
            :func:`~lightning_probes.functional.landscape.filter_normalize`) or ``"model"``
            (one Gaussian vector rescaled to :math:`\|\theta\|` as a whole; 1-D parameters
            included).
        one_dim: Policy for 1-D parameters under ``"filter"`` (default ``"zero"``).

    Returns:
        ``{name: tensor}`` shaped like ``params``.
    """
    if normalization not in ("filter", "model"):
        raise ValueError(f"`normalization` can be 'filter' or 'model', got {normalization!r}.")
    raw = {
        k: torch.randn(p.shape, generator=generator, device="cpu").to(p.device, p.dtype)
        for k, p in params.items()
    }
    if normalization == "model":
        scale = flatten(params).norm() / flatten(raw).norm().clamp_min(1e-12)
        return {k: d * scale for k, d in raw.items()}
    return {k: filter_normalize(raw[k], p, one_dim=one_dim) for k, p in params.items()}


def orthogonalize(direction: Mapping[str, Tensor], against: Mapping[str, Tensor]) -> Params:
    r"""Remove from ``direction`` its component along ``against``.

    One inner product over all parameters together:

    .. math:: d \leftarrow d - \frac{\langle d, a\rangle}{\|a\|^2}\, a
    """
    num = sum((direction[k] * a).sum() for k, a in against.items())
    den = sum(a.square().sum() for a in against.values())
    coef = num / den if float(den) > 0 else 0.0  # type: ignore[operator]
    return {k: d - coef * against[k] for k, d in direction.items()}


def combine(
    center: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]], coefs: Tensor
) -> Params:
    """Stack ``m`` points ``center + sum_k coefs[i, k] * directions[k]``.

    Args:
        center: ``{name: [*shape]}``.
        directions: ``K`` dicts shaped like ``center``.
        coefs: ``[m, K]`` coefficients.

    Returns:
        ``{name: [m, *shape]}``.
    """
    out = {}
    for k, c in center.items():
        dirs = torch.stack([d[k].reshape(-1) for d in directions])  # [K, P]
        co = coefs.to(c.device, c.dtype)  # [m, K]
        out[k] = torch.addmm(c.reshape(1, -1), co, dirs).reshape(len(co), *c.shape)
    return out


def batched_probe_loss(
    model: nn.Module,
    data: ProbeSet,
    stacked: Mapping[str, Tensor],
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    points_per_call: int | None = None,
    memory_budget_mb: float = 256.0,
) -> Tensor:
    r"""Probe-set loss at ``m`` parameter points, many points per forward via ``vmap``.

    Models with convolutions, and groups of one point, run one forward per point instead:
    ``vmap`` over convolution weights becomes a grouped convolution, measured 2.2-2.8x slower
    than a loop of forwards on a ResNet-18 on the CPU.

    Equals ``[probe_loss(model, data, {k: v[i]}) for i in range(m)]`` (the loss is averaged
    over chunks of ``chunk_size`` samples exactly like
    :func:`~lightning_probes.core.evaluation.probe_loss`). Points are processed in groups of
    ``points_per_call``; by default the group size is chosen so that the stacked parameters
    plus the activations of one chunk of samples fit in ``memory_budget_mb`` (activation size
    measured once with a one-sample forward pass). The model's buffers (e.g. BatchNorm running
    statistics, used in eval mode) are shared by all points. ``loss_fn`` must be ``vmap``-able
    (the default cross-entropy / MSE are).

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        stacked: ``{name: [m, *shape]}`` for some or all parameters.
        loss_fn: ``(outputs, targets) -> mean loss``.
        output_fn: Model output to logits.
        chunk_size: Samples per forward pass.
        points_per_call: Points per ``vmap`` call (default: from ``memory_budget_mb``).
        memory_budget_mb: Memory the default grouping aims for.

    Returns:
        ``[m]`` losses, detached.
    """
    m = next(iter(stacked.values())).shape[0]
    if points_per_call is None:
        first = next(iter(stacked.values()))
        numel = sum(v[0].numel() for v in stacked.values())
        points_per_call = _points_per_call(
            model, data, numel, first.element_size(), chunk_size, memory_budget_mb
        )

    def one_point(params: dict[str, Tensor]) -> Tensor:
        return probe_loss(
            model, data, params, loss_fn=loss_fn, output_fn=output_fn, chunk_size=chunk_size
        )

    with torch.no_grad():
        if points_per_call <= 1 or _has_convolution(model):
            # one point per forward: `vmap` would turn each convolution into a grouped one,
            # 2-3x slower than a forward per point on a ResNet (plane points x one forward)
            losses = [one_point({k: v[i] for k, v in stacked.items()}) for i in range(m)]
            return torch.stack(losses).detach()
        batched = vmap(one_point, randomness="error")
        out = []
        for start in range(0, m, points_per_call):
            group = {k: v[start : start + points_per_call] for k, v in stacked.items()}
            out.append(batched(group))
    return torch.cat(out).detach()


_CONVOLUTIONS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _has_convolution(model: nn.Module) -> bool:
    return any(isinstance(m, _CONVOLUTIONS) for m in model.modules())


def loss_plane(
    model: nn.Module,
    data: ProbeSet,
    center: Mapping[str, Tensor],
    u: Mapping[str, Tensor],
    v: Mapping[str, Tensor],
    *,
    alphas: Tensor | None = None,
    betas: Tensor | None = None,
    resolution: int = 11,
    span: float = 1.0,
    structured: bool = True,
    **kwargs: Any,
) -> LossPlane:
    r"""Loss on the plane :math:`L(\theta_c + a u + b v)` over a grid of ``(a, b)``.

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        center: :math:`\theta_c`, ``{name: [*shape]}``.
        u: First direction, shaped like ``center``.
        v: Second direction.
        alphas: ``[A]`` coordinates along ``u`` (default ``linspace(-span, span, resolution)``).
        betas: ``[B]`` coordinates along ``v`` (same default).
        resolution: Grid points per axis for the defaults.
        span: Half-width of the default grid.
        structured: Use the exact layer-chain path of
            :func:`~lightning_probes.core.landscape.affine.affine_family_loss` when the model
            allows it (first moved layer computed once per direction, per-point ``bmm``
            after it); ``False``, or a model it does not support: ``vmap`` over stacked
            parameters (:func:`batched_probe_loss`).
        **kwargs: Passed to :func:`batched_probe_loss` (or the structured path).

    Returns:
        A :class:`LossPlane` with ``losses[i, j]`` at ``(alphas[j], betas[i])``.
    """
    if not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"Expected `resolution` to be an int >= 2, got {resolution!r}.")
    grid = torch.linspace(-span, span, resolution, dtype=torch.float64, device="cpu")
    a = grid if alphas is None else alphas.double().cpu()
    b = grid if betas is None else betas.double().cpu()
    bb, aa = torch.meshgrid(b, a, indexing="ij")
    coefs = torch.stack([aa.reshape(-1), bb.reshape(-1)], dim=1)
    losses = (
        affine_family_loss(model, data, center, [u, v], coefs, **kwargs) if structured else None
    )
    if losses is None:
        losses = family_loss(model, data, center, [u, v], coefs, **kwargs)
    return LossPlane(a, b, losses.reshape(len(b), len(a)).cpu())


def loss_along_path(
    model: nn.Module,
    data: ProbeSet,
    anchors: Sequence[Mapping[str, Tensor]],
    *,
    points_per_segment: int = 11,
    structured: bool = True,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    r"""Loss along the polygonal chain through ``anchors`` (a segment when there are two).

    Segment ``s`` from :math:`\theta_s` to :math:`\theta_{s+1}` is sampled at
    ``points_per_segment`` evenly spaced :math:`t`, both ends included (shared ends once):
    :math:`L((1-t)\theta_s + t\,\theta_{s+1})`.

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        anchors: ``S + 1 >= 2`` parameter dicts with the same keys and shapes.
        points_per_segment: Points per segment including its ends (``>= 2``).
        structured: As in :func:`loss_plane` (the anchors are the directions, the centre 0).
        **kwargs: Passed to :func:`batched_probe_loss` (or the structured path).

    Returns:
        ``(t, losses)``, both ``[S * (points_per_segment - 1) + 1]``; ``t`` runs from 0 to
        ``S`` (integer ``t`` at the anchors).
    """
    if len(anchors) < 2:
        raise ValueError(f"Expected at least 2 `anchors`, got {len(anchors)}.")
    if not isinstance(points_per_segment, int) or points_per_segment < 2:
        raise ValueError(
            f"Expected `points_per_segment` to be an int >= 2, got {points_per_segment!r}."
        )
    local = torch.linspace(0, 1, points_per_segment, dtype=torch.float64, device="cpu")
    ts, rows = [], []
    for s in range(len(anchors) - 1):
        part = local if s == 0 else local[1:]
        ts.append(part + s)
        coefs = torch.zeros(len(part), len(anchors), dtype=torch.float64, device="cpu")
        coefs[:, s], coefs[:, s + 1] = 1 - part, part
        rows.append(coefs)
    coefs = torch.cat(rows)  # point i = sum_k coefs[i, k] * anchors[k]
    zero = {k: torch.zeros_like(p) for k, p in anchors[0].items()}
    losses = affine_family_loss(model, data, zero, anchors, coefs, **kwargs) if structured else None
    if losses is None:
        losses = family_loss(model, data, zero, anchors, coefs, **kwargs)
    return torch.cat(ts), losses.cpu()


def family_loss(
    model: nn.Module,
    data: ProbeSet,
    center: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coefs: Tensor,
    *,
    chunk_size: int | None = None,
    points_per_call: int | None = None,
    memory_budget_mb: float = 256.0,
    **kwargs: Any,
) -> Tensor:
    r"""Probe-set loss at the points :math:`\theta_c + \sum_k C_{ik} d_k`, group by group.

    Only one group's parameters exist at a time (:func:`combine` of that group's rows of
    ``coefs``), so the memory is that of ``points_per_call`` points (by default as many as fit
    in ``memory_budget_mb`` with their activations), not of every point of a plane.

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        center: :math:`\theta_c`, ``{name: [*shape]}``.
        directions: ``K`` dicts shaped like ``center``.
        coefs: ``[m, K]`` coefficients :math:`C`.
        chunk_size: Samples per forward pass.
        points_per_call: Points per group and ``vmap`` call (default: from the budget).
        memory_budget_mb: Memory the default grouping aims for.
        **kwargs: ``loss_fn``, ``output_fn`` of :func:`batched_probe_loss`.

    Returns:
        ``[m]`` losses, detached.
    """
    if points_per_call is None:
        ref = next(iter(center.values()))
        numel = sum(p.numel() for p in center.values())
        points_per_call = _points_per_call(
            model, data, numel, ref.element_size(), chunk_size, memory_budget_mb
        )
    group = max(1, points_per_call)
    parts = [
        batched_probe_loss(
            model,
            data,
            combine(center, directions, coefs[start : start + group]),
            chunk_size=chunk_size,
            points_per_call=group,
            **kwargs,
        )
        for start in range(0, coefs.shape[0], group)
    ]
    return torch.cat(parts)


def _points_per_call(
    model: nn.Module,
    data: ProbeSet,
    per_point_params: int,
    elem: int,
    chunk_size: int | None,
    budget_mb: float,
) -> int:
    inputs, _, n_chunk = chunks(data, chunk_size or len(data))[0]
    per_sample_acts = _activations_per_sample(model, inputs)
    # parameters of the point + activations of one chunk kept for the forward (x2: slack)
    per_point = elem * (per_point_params + 2 * n_chunk * per_sample_acts)
    return max(1, int(budget_mb * 2**20 // max(per_point, 1)))


def _activations_per_sample(model: nn.Module, inputs: Any) -> int:
    """Number of output elements of all leaf modules for one sample (one forward pass)."""
    total = [0]

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            total[0] += output[:1].numel() if output.ndim else 1

    one = slice_rows(inputs, 0, 1)
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            args, kwargs = model_arguments(one)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return max(total[0], 1)
