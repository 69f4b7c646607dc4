r"""Large-scale loss-landscape geometry as pure tensor math (Fort & Jastrzebski, NeurIPS 2019).

Fort & Jastrzebski, "Large Scale Structure of Neural Network Loss Landscapes", model the
low-loss set of a network as a union of *n-wedges*: n long (flat) directions and D - n short
(high-curvature) ones, radiating from the origin and widening with the radius
:math:`r^2 = \sum_i w_i^2`. Their explicit toy landscape places one n-wedge on every n-tuple
of coordinate axes, so the distance of a point :math:`P \in \mathbb{R}^D` to the nearest
wedge axis is the norm of its D - n smallest-magnitude coordinates.

Index letters: ``b`` a batch of points (any number of leading dimensions), ``D`` the
dimension of the space, ``n`` the number of long directions of a wedge.

This module also holds the flat-vector quantities the landscape probe logs (radius, angle,
radial share of an update) and the per-filter normalisation of random directions of
Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

OneDimPolicy = Literal["zero", "weights", "norm"]
"""How :func:`filter_normalize` treats 1-D parameters (biases, norm-layer scales)."""


def _check_points(points: Tensor, n: int) -> int:
    if not isinstance(points, Tensor) or points.ndim < 1 or not points.is_floating_point():
        raise TypeError(
            "Expected `points` to be a floating tensor [..., D], got "
            f"{getattr(points, 'shape', type(points).__name__)}."
        )
    dim = points.shape[-1]
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= dim:
        raise ValueError(f"Expected `n` to be an int in [0, D={dim}], got {n!r}.")
    return dim


def wedge_distance(points: Tensor, n: int) -> Tensor:
    r"""L2 distance of each point to the nearest axis-aligned n-dimensional subspace.

    The toy landscape of Fort & Jastrzebski puts one n-wedge on every n-tuple of axes; the
    nearest one keeps the n largest-magnitude coordinates, so

    .. math:: d(P) = \sqrt{\textstyle\sum_{i=1}^{D-n} P_{(i)}^2},
        \qquad P_{(1)}^2 \le P_{(2)}^2 \le \dots \le P_{(D)}^2 .

    (the text writes ``sorted(P)[:D-n]``; sorting by magnitude is what makes it a distance).

    Args:
        points: ``[..., D]`` points.
        n: Number of long directions of each wedge, ``0 <= n <= D``.

    Returns:
        ``[...]`` distances (0 exactly on every axis-aligned n-subspace).

    Raises:
        TypeError: If ``points`` is not a floating tensor with a last dimension.
        ValueError: If ``n`` is not in ``[0, D]``.

    Example:
        >>> wedge_distance(torch.tensor([[3.0, -0.3, 0.4, 5.0]]), n=2)
        tensor([0.5000])
    """
    dim = _check_points(points, n)
    squares = points.square()
    if n == dim:
        return squares.new_zeros(squares.shape[:-1])
    # the D - n smallest squares: topk of the negated squares (cheaper than a full sort)
    smallest = -torch.topk(-squares, dim - n, dim=-1, sorted=False).values
    return smallest.sum(-1).sqrt()


def nearest_wedge(points: Tensor, n: int) -> Tensor:
    """Boolean mask of the n long axes of each point's nearest wedge (largest magnitudes).

    Args:
        points: ``[..., D]`` points.
        n: Number of long directions.

    Returns:
        ``[..., D]`` bool, exactly ``n`` ``True`` per point (ties broken by ``torch.topk``).
    """
    _check_points(points, n)
    mask = torch.zeros(points.shape, dtype=torch.bool, device=points.device)
    if n == 0:
        return mask
    idx = torch.topk(points.abs(), n, dim=-1).indices
    return mask.scatter_(-1, idx, True)


def wedge_loss(
    points: Tensor,
    n: int,
    *,
    slope: float = 0.0,
    start_radius: float = 0.0,
    power: float = 2.0,
) -> Tensor:
    r"""Surrogate loss of the n-wedge toy landscape: monotone in the distance to the nearest wedge.

    A wedge is the set of points within half-width :math:`w(r)` of an axis-aligned
    n-subspace, where the width grows with the radius :math:`r = \|P\|` ("like a wedge",
    radiating from the sphere of radius ``start_radius``):

    .. math::
        w(r) = \text{slope} \cdot \max(r - r_0, 0), \qquad
        L(P) = \max\big(d(P) - w(\|P\|),\ 0\big)^{\text{power}},

    with :math:`d` from :func:`wedge_distance`. ``slope=0`` is the text's bare model (the loss
    depends only on the distance to the n-subspaces). Beyond the text, which says only that the
    loss is monotone in the distance and that wedges widen with r, ``start_radius > 0`` makes
    the region near the origin lossy, as in real networks whose outputs vanish there; this is
    what makes a random hyperplane meet a wedge more easily at larger radius.

    Args:
        points: ``[..., D]`` points (differentiable).
        n: Number of long directions of each wedge.
        slope: Growth of the wedge half-width per unit of radius (``>= 0``).
        start_radius: Radius :math:`r_0` at which wedges start to widen (``>= 0``).
        power: Exponent of the monotone map (``> 0``; 2 gives a smooth quadratic well).

    Returns:
        ``[...]`` losses, 0 inside every wedge.

    Raises:
        ValueError: For negative ``slope``/``start_radius`` or non-positive ``power``.

    Example:
        >>> p = torch.tensor([[3.0, 0.0, 0.4, 5.0], [1.0, 1.0, 1.0, 1.0]])
        >>> wedge_loss(p, n=2)
        tensor([0.1600, 2.0000])
    """
    for name, value in (("slope", slope), ("start_radius", start_radius)):
        if not value >= 0:
            raise ValueError(f"Expected `{name}` to be >= 0, got {value!r}.")
    if not power > 0:
        raise ValueError(f"Expected `power` to be > 0, got {power!r}.")
    dist = wedge_distance(points, n)
    if slope:
        radius = points.norm(dim=-1)
        dist = dist - slope * (radius - start_radius).clamp_min(0)
    return dist.clamp_min(0).pow(power)


def cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Cosine of the angle between two flat vectors, :math:`\langle a,b\rangle/(\|a\|\|b\|)`.

    Computed in float64 (0 when either vector is 0).

    Args:
        a: ``[D]`` vector.
        b: ``[D]`` vector.
        eps: Norms below this count as 0.

    Returns:
        A scalar float64 tensor in ``[-1, 1]``.
    """
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a64.norm(), b64.norm()
    if float(na) <= eps or float(nb) <= eps:
        return a64.new_zeros(())
    return (a64 @ b64 / (na * nb)).clamp(-1.0, 1.0)


def angle_degrees(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\arccos` of :func:`cosine` in degrees (the angle between a and b seen from 0)."""
    return torch.rad2deg(torch.arccos(cosine(a, b)))


def filter_normalize(
    direction: Tensor, weights: Tensor, *, one_dim: OneDimPolicy = "zero", eps: float = 1e-10
) -> Tensor:
    r"""Rescale a random direction filter by filter to the norm of the weights (Li et al. 2018).

    For a parameter of two or more dimensions, each slice along the first (output) axis — a
    row of a Linear weight, an output filter of a conv — is rescaled:

    .. math:: d_j \leftarrow \frac{d_j}{\|d_j\| + \epsilon}\, \|w_j\| .

    1-D parameters (biases, norm scales) follow ``one_dim``: ``"zero"`` (default, Li et al.'s
    ``ignore='biasbn'``: the plane does not move them), ``"weights"`` (the direction is the
    parameter itself, Li et al.'s other option) or ``"norm"`` (the whole vector is one filter).
    0-D parameters are treated as 1-D.

    Args:
        direction: Random direction, same shape as ``weights``.
        weights: The parameter it perturbs.
        one_dim: Policy for parameters with ``ndim <= 1``.
        eps: Added to the direction norm.

    Returns:
        A new tensor shaped like ``weights``.

    Raises:
        ValueError: On a shape mismatch or an unknown ``one_dim``.
    """
    if direction.shape != weights.shape:
        raise ValueError(
            f"Expected `direction` shaped like `weights` {tuple(weights.shape)}, got "
            f"{tuple(direction.shape)}."
        )
    if one_dim not in ("zero", "weights", "norm"):
        raise ValueError(f"`one_dim` can be 'zero', 'weights' or 'norm', got {one_dim!r}.")
    if weights.ndim <= 1:
        if one_dim == "zero":
            return torch.zeros_like(weights)
        if one_dim == "weights":
            return weights.detach().clone()
        return direction * (weights.norm() / (direction.norm() + eps))
    d = direction.flatten(1)
    w = weights.detach().flatten(1)
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + eps)
    return (d * scale).reshape(weights.shape)


def interpolation_barrier(losses: Tensor, t: Tensor) -> Tensor:
    r"""Height of the loss above the straight line joining its end points along a segment.

    .. math:: B = \max_t \big(L(t) - [(1 - t) L(0) + t L(1)]\big)

    (Frankle et al.'s linear-mode-connectivity barrier; 0 when the segment stays below the
    chord). ``t`` must start at 0 and end at 1.

    Args:
        losses: ``[m]`` losses along the segment.
        t: ``[m]`` positions in ``[0, 1]``, increasing.

    Returns:
        A scalar tensor ``>= 0`` (up to rounding; exactly ``max(..., 0)``).
    """
    if losses.shape != t.shape or losses.ndim != 1 or len(t) < 2:
        raise ValueError(
            f"Expected `losses` and `t` of the same shape [m >= 2], got {tuple(losses.shape)} "
            f"and {tuple(t.shape)}."
        )
    if not (math.isclose(float(t[0]), 0.0) and math.isclose(float(t[-1]), 1.0)):
        raise ValueError(f"Expected `t` to run from 0 to 1, got {float(t[0])}..{float(t[-1])}.")
    chord = (1 - t) * losses[0] + t * losses[-1]
    return (losses - chord).max().clamp_min(0)


def drift_from_init(theta: Tensor, init: Tensor) -> dict[str, Tensor]:
    r"""Where the weights are relative to the origin and to their initialisation.

    For flat vectors :math:`\theta` and :math:`\theta_0` (both cast to float64):

    .. math::
        r = \|\theta\|, \qquad d = \|\theta - \theta_0\|, \qquad
        \angle(\theta, \theta_0), \qquad \cos(\theta - \theta_0, \theta_0),

    the radius, the distance travelled, the angle (degrees) seen from the origin, and the radial
    share of the whole displacement (Fort & Jastrzebski, 2019: training moves mostly
    outwards).

    Args:
        theta: ``[D]`` current weights.
        init: ``[D]`` weights at initialisation.

    Returns:
        ``{"radius", "distance_from_init", "angle_from_init", "init_radial_cosine"}``, scalar
        float64 tensors.

    Example:
        >>> out = drift_from_init(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
        >>> [float(out[k]) for k in ("radius", "distance_from_init", "init_radial_cosine")]
        [2.0, 1.0, 1.0]
    """
    now, start = theta.double(), init.double()
    return {
        "radius": now.norm(),
        "distance_from_init": (now - start).norm(),
        "angle_from_init": angle_degrees(now, start),
        "init_radial_cosine": cosine(now - start, start),
    }


def update_radial_cosine(after: Tensor, before: Tensor) -> Tensor:
    r"""Radial share of one update: :math:`\cos(\theta_{t+1} - \theta_t, \theta_t)`.

    Positive: the step moved outwards (Fort & Jastrzebski, 2019). The difference is taken in
    the weights' dtype, the cosine in float64.

    Args:
        after: ``[D]`` weights after the step.
        before: ``[D]`` weights before it.

    Returns:
        A scalar float64 tensor in ``[-1, 1]``.
    """
    return cosine(after - before, before)
