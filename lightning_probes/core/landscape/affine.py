r"""Exact loss on an affine family of weights (planes, segments) for chains of known layers.

Every point of a loss plane (Fort & Jastrzebski, NeurIPS 2019; Li et al., NeurIPS 2018) or of
a polygonal path through weight space is :math:`\theta_i = \theta_c + \sum_k C_{ik} d_k`. When
the network is a chain of known layers (checked by tracing one sample through it,
:func:`~lightning_probes.core.landscape.chain.trace_chain`), three facts
make the family much cheaper to evaluate than one ``functional_call`` per point, while the
result stays the per-point loss up to float rounding:

* Layers before the first one the directions move have the same weights at every point, so
  their output is computed once.
* That first moved layer (Linear, Conv, eval-mode BatchNorm, LayerNorm) is linear in its
  parameters: its output at point :math:`i` is
  :math:`f(h; \theta_c) + \sum_k C_{ik} f(h; d_k)` -- ``K + 1`` forward products for all
  points instead of one per point, combined by one ``mm`` with ``[1, C_i]``.
* The remaining layers run for a group of ``P`` points at once with per-point weights built
  on the fly (one ``baddbmm`` per Linear layer), and the loss is reduced for the group at once.

Index letters: ``P`` points of a group, ``K`` directions, ``n`` samples of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import LossFn, OutputFn, chunks, default_loss
from lightning_probes.core.landscape.chain import Link, trace_chain
from lightning_probes.core.modules import ops_for

_CPU_GROUP_BYTES = 8 * 2**20  # activations of a group of points kept cache-sized on the CPU


def affine_family_loss(
    model: nn.Module,
    data: ProbeSet,
    center: Mapping[str, Tensor],
    directions: Sequence[Mapping[str, Tensor]],
    coefs: Tensor,
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    points_per_call: int | None = None,
    memory_budget_mb: float = 256.0,
) -> Tensor | None:
    r"""Probe-set loss at the points :math:`\theta_c + \sum_k C_{ik} d_k`, or ``None``.

    Equals ``probe_loss(model, data, point_i)`` for every point up to float rounding
    (same chunking of the probe set, same weighting of the chunks). Returns ``None`` when the
    model is not a chain of supported layers (see :func:`trace_chain`) or ``output_fn`` is
    given; the caller then falls back to ``vmap`` over stacked parameters.

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        center: :math:`\theta_c`, ``{name: [*shape]}`` for some or all parameters.
        directions: ``K`` dicts shaped like ``center``.
        coefs: ``[m, K]`` coefficients :math:`C`.
        loss_fn: ``(outputs, targets) -> mean loss`` (default: cross-entropy / MSE, reduced
            for all points of a group at once; a custom one is called once per point).
        output_fn: Must be ``None`` for this path.
        chunk_size: Samples per forward pass.
        points_per_call: Points per group (default: from ``memory_budget_mb``).
        memory_budget_mb: Memory the default grouping aims for.

    Returns:
        ``[m]`` losses, or ``None`` (unsupported model).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> data = ProbeSet(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> theta = {k: p.detach() for k, p in net.named_parameters()}
        >>> ones = {k: torch.ones_like(p) for k, p in theta.items()}
        >>> affine_family_loss(net, data, theta, [ones], torch.tensor([[0.0], [0.5]])).shape
        torch.Size([2])
    """
    if data.targets is None:
        raise ValueError("Expected a probe set with targets to evaluate a loss, got none.")
    chain = None if output_fn is not None else trace_chain(model, data.inputs)
    if chain is None:
        return None
    moved = [
        any(n in center and any(bool(d[n].any()) for d in directions) for n in link.names.values())
        for link in chain
    ]
    first = moved.index(True) if any(moved) else len(chain)
    ref = next(iter(center.values()))
    coefs = coefs.to(ref.device, ref.dtype)
    ones_coefs = torch.cat([torch.ones_like(coefs[:, :1]), coefs], dim=1)  # [m, 1 + K]
    # [1 + K, numel] per moved parameter (centre row first): a group's values are one mm away
    stacks = {
        n: torch.stack([center[n].reshape(-1)] + [d[n].reshape(-1) for d in directions])
        for link, mv in zip(chain, moved)
        if mv
        for n in link.names.values()
        if n in center
    }
    m, n_total = coefs.shape[0], len(data)
    n_chunk = chunks(data, chunk_size)[0][2]
    if points_per_call is None:
        per_point = sum(s.shape[1] for s in stacks.values())
        acts = 2 * n_chunk * sum(link.width for link in chain[first:]) * ref.element_size()
        per_point = per_point * ref.element_size() + acts
        points_per_call = int(memory_budget_mb * 2**20 // max(1, per_point))
        if ref.device.type == "cpu":  # larger groups spill the caches and lose
            points_per_call = min(points_per_call, _CPU_GROUP_BYTES // max(1, acts))
    group = max(1, points_per_call)
    budget = memory_budget_mb * 2**20 / 4
    steps = [
        _step(link, mv, center, stacks, ones_coefs, budget)
        for link, mv in zip(chain[first + 1 :], moved[first + 1 :])
    ]
    total = torch.zeros(m, dtype=torch.float64, device=ref.device)
    with torch.no_grad():
        for x, targets, size in chunks(data, chunk_size):
            assert targets is not None
            h, reduce = x, _reducer(targets, loss_fn)
            for link in chain[:first]:
                h = _shared_forward(link, _fixed(link, center), h)
            if first == len(chain):  # no layer moves: one loss for every point
                total += float(reduce(h[None])[0]) * size / n_total
                continue
            base, prods = _products(chain[first], center, directions, h)
            parts = []
            for start in range(0, m, group):
                sl = slice(start, start + group)
                c = ones_coefs[sl]
                z = torch.mm(c, prods).view(len(c), *base.shape)
                for step in steps:
                    z = step(z, sl)
                parts.append(reduce(z))
            total += torch.cat(parts).to(total.dtype) * (size / n_total)
    return total.to(ref.dtype)


def _fixed(link: Link, center: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The layer's parameters where no direction moves it (centre value or its own)."""
    own = link.module._parameters
    return {k: center[n] if n in center else own[k].detach() for k, n in link.names.items()}  # type: ignore[union-attr]


def _step(
    link: Link,
    moved: bool,
    center: Mapping[str, Tensor],
    stacks: Mapping[str, Tensor],
    coefs: Tensor,
    budget: float,
) -> Callable[[Tensor, slice], Tensor]:
    """``(z [P, n, ...], points) -> the layer's output at those points (rows of coefs)``."""
    if type(link.module) is nn.ReLU:
        return lambda z, sl: z.relu_()  # z is the group's own temporary
    fixed = _fixed(link, center)
    if not moved:
        return lambda z, sl: _folded(link, fixed, z)
    rows = {k: stacks.get(n) for k, n in link.names.items()}
    m, size = len(coefs), sum(p.numel() * p.element_size() for p in fixed.values())
    # the layer's parameters at every point, one mm each: at once when small, else per group
    every = {k: torch.mm(coefs, r) for k, r in rows.items() if r is not None and m * size < budget}

    def per_point(z: Tensor, sl: slice) -> Tensor:
        c = coefs[sl]
        w = {
            k: fixed[k].expand(len(c), *fixed[k].shape)
            if r is None
            else (every[k][sl] if k in every else torch.mm(c, r)).view(len(c), *fixed[k].shape)
            for k, r in rows.items()
        }
        return _per_point_forward(link, w, z)

    return per_point


def _shared_forward(link: Link, params: dict[str, Tensor], h: Tensor) -> Tensor:
    return functional_call(link.module, params, (h,)) if params else link.module(h)


def _folded(link: Link, params: dict[str, Tensor], z: Tensor) -> Tensor:
    """Layer with the same weights at every point on ``z [P, n, ...]`` (points folded)."""
    out = _shared_forward(link, params, z.flatten(0, 1))
    return out.view(*z.shape[:2], *out.shape[1:])


def _products(
    link: Link, center: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]], h: Tensor
) -> tuple[Tensor, Tensor]:
    r""":math:`f(h; \theta_c)` and the ``[1 + K, numel]`` rows :math:`f(h; \theta_c), f(h; d_k)`.

    Exact for layers linear in their parameters jointly (Linear, Conv, BatchNorm in eval mode,
    LayerNorm): a parameter that no direction covers enters the base term only.
    """
    fixed = _fixed(link, center)
    base = _shared_forward(link, fixed, h)
    prods = [
        _shared_forward(
            link,
            {k: d[n] if n in d else torch.zeros_like(fixed[k]) for k, n in link.names.items()},
            h,
        ).reshape(-1)
        for d in directions
    ]
    return base, torch.stack([base.reshape(-1), *prods])


def _per_point_forward(link: Link, w: dict[str, Tensor], z: Tensor) -> Tensor:
    """Layer with per-point weights ``w`` (``[P, *shape]``) on ``z [P, n, ...]``."""
    ops = ops_for(link.module, exact=True)
    assert ops is not None and ops.jointly_affine  # checked by trace_chain
    return ops.per_point_forward(link.module, w, z)


def _reducer(targets: Tensor, loss_fn: LossFn | None) -> Callable[[Tensor], Tensor]:
    """``z [P, n, ...] -> [P]`` mean loss of each point's outputs on the chunk's targets."""
    fn = loss_fn or default_loss

    def per_point(z: Tensor) -> Tensor:
        return torch.stack([fn(z[i], targets) for i in range(z.shape[0])])

    if loss_fn is not None:
        return per_point
    if torch.is_floating_point(targets):

        def squared(z: Tensor) -> Tensor:
            if z.shape[1:] != targets.shape:  # broadcasting: as mse_loss does it
                return per_point(z)
            return (z - targets.to(z.dtype)).square().reshape(z.shape[0], -1).mean(1)

        return squared
    # cross-entropy with 'mean' divides by the number of non-ignored targets: batch it only
    # when none is ignored (then that number is the number of elements)
    if bool((targets == -100).any()):
        return per_point

    def cross_entropy(z: Tensor) -> Tensor:
        p = z.shape[0]
        if z.ndim == 3 and targets.ndim == 1:  # -log softmax_t = logsumexp - z_t (faster on CPU)
            picked = z.gather(2, targets.expand(p, -1).unsqueeze(2)).squeeze(2)
            return (torch.logsumexp(z, 2) - picked).mean(1)
        flat = targets.expand(p, *targets.shape).reshape(-1, *targets.shape[1:])
        return F.cross_entropy(z.flatten(0, 1), flat, reduction="none").view(p, -1).mean(1)

    return cross_entropy
