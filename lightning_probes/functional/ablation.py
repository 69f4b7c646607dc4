r"""Cumulative ablation curves as pure tensor math (Morcos et al., ICLR 2018, section 2.2).

"On the importance of single directions for generalization" ablates units (single features of
a fully connected layer, whole feature maps of a convolutional one) cumulatively, in random
orders, and measures the accuracy on the training set as a function of the fraction of units
ablated. This module holds what does not touch a network: which units each ordering ablates at
each point of the curve, and the curve's summary (mean, std, area under the curve).

Index letters: ``r`` orderings, ``k`` points of the curve, ``u`` units (all ablated layers
concatenated).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ablation_counts(fractions: Tensor, num_units: int) -> Tensor:
    r"""Number of units ablated at each fraction: :math:`m_k = \mathrm{round}(f_k U)`.

    Args:
        fractions: ``[k]`` fractions in ``[0, 1]``, non-decreasing.
        num_units: Total number of units :math:`U` (all ablated layers).

    Returns:
        ``[k]`` int64 counts in ``[0, U]``.

    Raises:
        ValueError: If ``fractions`` is not a non-empty, non-decreasing 1-d tensor in [0, 1].

    Example:
        >>> ablation_counts(torch.tensor([0.0, 0.5, 1.0]), 5).tolist()
        [0, 2, 5]
    """
    if fractions.ndim != 1 or fractions.numel() == 0:
        raise ValueError(
            "Expected `fractions` to be a non-empty 1-d tensor, got shape "
            f"{tuple(fractions.shape)}."
        )
    f = fractions.detach().to(torch.float64).cpu()
    if bool((f < 0).any() or (f > 1).any() or (f[1:] < f[:-1]).any()):
        raise ValueError(
            f"Expected `fractions` to be non-decreasing values in [0, 1], got {f.tolist()}."
        )
    if not isinstance(num_units, int) or num_units < 1:
        raise ValueError(f"Expected `num_units` to be a positive int, got {num_units!r}.")
    return torch.round(f * num_units).to(torch.int64)


def cumulative_keep_masks(orderings: Tensor, counts: Tensor) -> Tensor:
    r"""Keep-masks of cumulative ablation: each ordering ablates its first :math:`m_k` units.

    .. math:: \mathrm{keep}_{r,k,j} = [\, \mathrm{rank}_r(j) \ge m_k \,]

    where :math:`\mathrm{rank}_r(j)` is the position of unit :math:`j` in ordering :math:`r`.

    Args:
        orderings: ``[r, u]`` permutations of ``0..u-1`` (the order units are ablated in).
        counts: ``[k]`` numbers of units ablated (non-decreasing).

    Returns:
        ``[r, k, u]`` bool, ``True`` where the unit is kept (not ablated).

    Example:
        >>> keep = cumulative_keep_masks(torch.tensor([[2, 0, 1]]), torch.tensor([0, 1, 3]))
        >>> keep[0].int().tolist()
        [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    """
    r, u = orderings.shape
    ranks = torch.empty_like(orderings)
    positions = torch.arange(u, device=orderings.device).expand(r, u)
    ranks.scatter_(1, orderings, positions)
    return ranks[:, None, :] >= counts.to(orderings.device)[None, :, None]


def curve_area(x: Tensor, y: Tensor) -> Tensor:
    r"""Area under a curve by the trapezoid rule, in float64.

    .. math:: \mathrm{AUC} = \sum_k \tfrac{1}{2} (x_{k+1} - x_k)(y_{k+1} + y_k)

    Args:
        x: ``[k]`` abscissae, non-decreasing (for ablation curves: the fraction of units
            ablated, from 0 to 1, so an accuracy of 1 everywhere has area 1).
        y: ``[..., k]`` ordinates.

    Returns:
        ``[...]`` areas (a 0-d tensor for a single curve).

    Example:
        >>> curve_area(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 0.0])).item()
        0.75
    """
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    return torch.trapezoid(y64, x64, dim=-1)


def summarize_curves(accuracy: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased, Bessel-corrected) standard deviation over orderings.

    Args:
        accuracy: ``[r, k]`` accuracy of each ordering at each point.

    Returns:
        ``(mean [k], std [k])``; the std is 0 for a single ordering.
    """
    mean = accuracy.mean(0)
    if accuracy.shape[0] < 2:
        return mean, torch.zeros_like(mean)
    return mean, accuracy.std(0, correction=1)
