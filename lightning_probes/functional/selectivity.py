r"""Class selectivity and information of single units (Morcos et al., ICLR 2018, sec. 2.3).

Index letters: ``n`` samples, ``u`` units, ``c`` classes, ``b`` bins. A unit's activity is one
number per sample: the post-activation of a fully connected unit, or the spatial mean of a
feature map.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional import pearson_corrcoef


def class_conditional_means(
    activity: Tensor, targets: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    r"""Mean activity of each unit per class: :math:`\mu_{c,j} = \mathrm{mean}_{i: y_i=c} a_{i,j}`.

    Args:
        activity: ``[n, u]`` unit activity.
        targets: ``[n]`` class indices in ``[0, num_classes)``.
        num_classes: Number of classes ``c``.

    Returns:
        ``(means [c, u], present [c])`` in float64; rows of classes absent from ``targets``
        are 0 and ``present`` is ``False`` there.

    Raises:
        ValueError: If a target is outside ``[0, num_classes)``.
    """
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"Expected `targets` in [0, {num_classes}), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]. Check `num_classes`."
        )
    a = activity.detach().to(torch.float64)
    sums = torch.zeros(num_classes, a.shape[1], dtype=torch.float64, device=a.device)
    sums.index_add_(0, targets.to(a.device), a)
    counts = torch.bincount(targets.to(a.device), minlength=num_classes).to(torch.float64)
    present = counts > 0
    return sums / counts.clamp_min(1)[:, None], present


def selectivity_index(class_means: Tensor, present: Tensor | None = None) -> Tensor:
    r"""Class selectivity index of each unit (Morcos et al., 2018, eq. 1).

    .. math::
        \mathrm{SI}_j = \frac{\mu_{\max,j} - \mu_{-\max,j}}{\mu_{\max,j} + \mu_{-\max,j}}

    where :math:`\mu_{\max}` is the largest class-conditional mean and :math:`\mu_{-\max}` the
    mean of the other (present) classes' means. 0: identical activity for all classes; 1:
    active for one class only. Dead units (:math:`\mu_{\max} + \mu_{-\max} = 0`) get 0, as in
    the paper. The index is defined for non-negative (post-ReLU) activity, where it lies in
    ``[0, 1]``; negative class means are refused (with them it leaves ``[0, 1]``: a signed
    "selectivity" of -40 or 130 is no selectivity), so a value outside ``[0, 1]`` is never
    returned.

    Args:
        class_means: ``[c, u]`` class-conditional means, non-negative.
        present: ``[c]`` which classes to use (default: all).

    Returns:
        ``[u]`` float64 in ``[0, 1]``.

    Raises:
        ValueError: If fewer than 2 classes are present, or a class mean is negative.

    Example:
        >>> means = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
        >>> selectivity_index(means).tolist()
        [1.0, 0.0, 0.0]
    """
    means = class_means.to(torch.float64)
    if present is not None:
        means = means[present.to(means.device)]
    if means.shape[0] < 2:
        raise ValueError(f"Expected at least 2 classes present, got {means.shape[0]}.")
    if bool((means < 0).any()):
        units = (means < 0).any(0).nonzero().squeeze(1).tolist()
        raise ValueError(
            f"Expected non-negative class-conditional means (post-ReLU activity), got negative "
            f"means for units {units[:10]}{'...' if len(units) > 10 else ''} (minimum "
            f"{float(means.min()):.3g}). The selectivity index is defined for non-negative "
            "activity: select layers followed by a ReLU."
        )
    top = means.max(0).values
    rest = ((means.sum(0) - top) / (means.shape[0] - 1)).clamp(max=top)  # rounding: rest <= top
    denom = top + rest
    safe = torch.where(denom == 0, torch.ones_like(denom), denom)
    si = torch.where(denom == 0, torch.zeros_like(denom), (top - rest) / safe)
    if not bool(((si >= 0) & (si <= 1)).all()):  # NaN (non-finite means) included
        raise ValueError(
            f"Expected finite class-conditional means, got a selectivity outside [0, 1] "
            f"({si[~((si >= 0) & (si <= 1))][:5].tolist()})."
        )
    return si


def binned_mutual_information(
    activity: Tensor, targets: Tensor, num_classes: int, num_bins: int = 10
) -> Tensor:
    r"""Mutual information (bits) between each unit's binned activity and the class.

    Activity is cut into ``num_bins`` equal-width bins between the unit's minimum and maximum
    over the samples (a constant unit carries no information: 0), then

    .. math:: I_j = \sum_{b,c} p_j(b, c) \log_2 \frac{p_j(b, c)}{p_j(b)\, p(c)}

    with empirical (plug-in) probabilities. Morcos et al. (2018, appendix A.5) compare it with
    class selectivity as a predictor of a unit's importance.

    All units at once, in bits. (``torchmetrics``' ``mutual_info_score`` takes one pair of
    label vectors per call, in nats, with a different summation: a loop over the units that
    changes the numbers.)

    Args:
        activity: ``[n, u]`` unit activity.
        targets: ``[n]`` class indices.
        num_classes: Number of classes ``c``.
        num_bins: Number of bins ``b``.

    Returns:
        ``[u]`` float64, in ``[0, log2(min(num_bins, num_classes))]``.
    """
    if not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"Expected `num_bins` to be an int >= 2, got {num_bins!r}.")
    a = activity.detach().to(torch.float64)
    n, u = a.shape
    lo, hi = a.min(0).values, a.max(0).values
    width = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    bins = ((a - lo) / width * num_bins).floor().clamp(0, num_bins - 1).long()
    bins = torch.where(hi > lo, bins, torch.zeros_like(bins))
    y = targets.to(a.device)
    joint = torch.zeros(u, num_bins * num_classes, dtype=torch.float64, device=a.device)
    ones = torch.ones(u, n, dtype=a.dtype, device=a.device)
    joint.scatter_add_(1, (bins * num_classes + y[:, None]).T, ones)
    p = joint.view(u, num_bins, num_classes) / n
    pb, pc = p.sum(2, keepdim=True), p.sum(1, keepdim=True)
    ratio = torch.where(p > 0, p / (pb * pc).clamp_min(1e-300), torch.ones_like(p))
    return (p * torch.log2(ratio)).sum((1, 2)).clamp_min(0.0)


def spearman_correlation(x: Tensor, y: Tensor) -> Tensor:
    r"""Spearman rank correlation: Pearson correlation of the ranks (ties get average ranks).

    .. math:: \rho = \frac{\mathrm{cov}(R(x), R(y))}{\sigma_{R(x)} \sigma_{R(y)}}

    In float64: average ranks here (ties share the mean of their ranks), their Pearson
    correlation by ``torchmetrics``' :func:`~torchmetrics.functional.pearson_corrcoef`.
    (``torchmetrics``' own ``spearman_corrcoef`` is not used: it adds ``1e-6`` to the
    denominator, clamps to ``[-1, 1]`` and returns 0 for a constant input, where the
    correlation is undefined.)

    Args:
        x: ``[u]`` values.
        y: ``[u]`` values.

    Returns:
        0-d float64; NaN when either input is constant or has fewer than 2 values.

    Example:
        >>> spearman_correlation(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 4.0, 9.0]))
        tensor(1., dtype=torch.float64)
    """
    rx, ry = _average_ranks(x), _average_ranks(y)
    if x.numel() < 2 or bool((rx == rx[0]).all()) or bool((ry == ry[0]).all()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=x.device)
    return pearson_corrcoef(rx, ry)


def _average_ranks(x: Tensor) -> Tensor:
    v = x.detach().to(torch.float64).flatten()
    ranks = torch.empty_like(v)
    ranks[v.argsort()] = torch.arange(v.numel(), dtype=torch.float64, device=v.device)
    _, inverse = torch.unique(v, return_inverse=True)
    size = int(inverse.max()) + 1 if v.numel() else 0
    sums = torch.zeros(size, dtype=torch.float64, device=v.device).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse).to(torch.float64)
    return (sums / counts)[inverse]
