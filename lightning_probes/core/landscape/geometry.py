r"""Which cuts of weight space the landscape probe looks at, and what counts as "short".

Fort & Jastrzebski, "Large Scale Structure of Neural Network Loss Landscapes" (NeurIPS 2019):
training moves mostly radially, and a 2-D cut spanned by the radial direction :math:`\theta`
and a random direction shows the "radial tunnel"; a cut of two random directions is Li et al.'s
(2018) view. A direction is "short" when the curvature along it is high: a top Hessian
eigenvalue above a threshold, absolute or relative to the largest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lightning_probes.core.landscape.planes import Params, orthogonalize, random_direction
from lightning_probes.functional.landscape import OneDimPolicy

PlaneKind = Literal["radial", "random"]
ThresholdMode = Literal["relative", "absolute"]


def plane_directions(
    theta: Mapping[str, Tensor],
    kind: PlaneKind,
    *,
    generator: torch.Generator,
    one_dim: OneDimPolicy = "zero",
) -> tuple[Params, Params]:
    r"""The directions ``(u, v)`` of a loss plane :math:`\theta + a u + b v` through ``theta``.

    ``"radial"``: :math:`u = \theta` (so :math:`a = -1` is the origin) and :math:`v` a
    filter-normalised random direction made orthogonal to :math:`\theta`; ``"random"``: two
    filter-normalised random directions (Li et al. 2018), drawn in that order from
    ``generator``.

    Args:
        theta: The weights, ``{name: tensor}``.
        kind: ``"radial"`` or ``"random"``.
        generator: CPU generator of the random directions.
        one_dim: Policy for 1-D parameters (see
            :func:`~lightning_probes.functional.landscape.filter_normalize`).

    Returns:
        ``(u, v)``, each shaped like ``theta``.
    """
    first = random_direction(theta, generator=generator, one_dim=one_dim)
    if kind == "radial":
        return dict(theta), orthogonalize(first, theta)
    return first, random_direction(theta, generator=generator, one_dim=one_dim)


def short_direction_threshold(
    eigenvalues: Tensor, threshold: float, mode: ThresholdMode = "relative"
) -> float:
    r"""The curvature above which a direction counts as short.

    .. math:: \tau = \begin{cases} t\,\lambda_1 & \text{relative} \\ t & \text{absolute}
        \end{cases}

    Args:
        eigenvalues: ``[k]`` top Hessian eigenvalues, largest first.
        threshold: :math:`t`.
        mode: ``"relative"`` (times the largest eigenvalue) or ``"absolute"``.

    Returns:
        :math:`\tau`.

    Example:
        >>> short_direction_threshold(torch.tensor([10.0, 2.0]), 0.1)
        1.0
    """
    tau = threshold
    if mode == "relative":
        tau *= float(eigenvalues[0])
    return tau
