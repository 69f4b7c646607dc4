r"""A layer's class selectivity in one call: the per-unit index and what the probe logs of it.

Morcos et al. (ICLR 2018), sec. 2.3 and 3.4: each unit's class selectivity index from its
class-conditional mean activity (:mod:`lightning_probes.functional.selectivity`), summarised
per layer as the mean index, the fraction of highly selective units and the fraction of dead
units. Index letters: ``n`` samples, ``u`` units.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lightning_probes.functional.selectivity import class_conditional_means, selectivity_index


@dataclass
class LayerSelectivity:
    """Class selectivity of one layer's units.

    Attributes:
        selectivity: ``[u]`` float64 selectivity index per unit (dead units 0).
        mean: Mean index over the units.
        frac_selective: Fraction of units whose index is above the threshold.
        frac_dead: Fraction of units with zero activity on every sample.
    """

    selectivity: Tensor
    mean: float
    frac_selective: float
    frac_dead: float


def layer_selectivity(
    activity: Tensor, targets: Tensor, num_classes: int, *, threshold: float = 0.5
) -> LayerSelectivity:
    r"""Selectivity index of each unit of a layer and its per-layer summary.

    .. math::
        \mathrm{SI}_j = \frac{\mu_{\max,j} - \mu_{-\max,j}}{\mu_{\max,j} + \mu_{-\max,j}},
        \qquad \text{frac\_selective} = \tfrac{1}{u} \#\{j : \mathrm{SI}_j > t\}

    Args:
        activity: ``[n, u]`` unit activity (post-activation; feature maps spatially averaged).
        targets: ``[n]`` class indices in ``[0, num_classes)``.
        num_classes: Number of classes.
        threshold: :math:`t`, the index above which a unit counts as highly selective.

    Returns:
        A :class:`LayerSelectivity`.

    Raises:
        ValueError: If a target is outside ``[0, num_classes)`` or fewer than 2 classes occur.

    Example:
        >>> import torch
        >>> act = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 2.0]])
        >>> out = layer_selectivity(act, torch.tensor([0, 1]), 2)
        >>> out.selectivity.tolist(), out.frac_selective, out.frac_dead
        ([1.0, 0.0, 0.0], 0.3333333333333333, 0.3333333333333333)
    """
    means, present = class_conditional_means(activity, targets, num_classes)
    si = selectivity_index(means, present)
    return LayerSelectivity(
        selectivity=si,
        mean=float(si.mean()),
        frac_selective=float((si > threshold).double().mean()),
        frac_dead=float((activity.abs().amax(0) == 0).double().mean()),
    )
