r"""Parameter-free layers that treat every sample alone: activations, pooling, dropout.

Also identity and flatten.

**The one elementwise set.** :data:`ACTIVATIONS` lists the elementwise activations the probes
know. Each probe asks its own question of them, stated as a property of the entry:

- ``activation`` (every member): may be the ablation point a layer's sparse per-mask
  computation leads to (:mod:`lightning_probes.core.interventions.shortcuts`; a subclass
  counts).
- ``foldable``: may run on many weight points at once with points and samples folded into one
  batch (:mod:`lightning_probes.core.landscape.chain`; exact types only, no parameters or
  buffers). ``PReLU`` has a parameter, so the chain rejects it either way; ``LogSigmoid``
  and ``Threshold`` were never in the chain's set and stay out (``foldable=False``) so that
  its path, and its numbers, do not change; nor do ``RReLU``, ``Hardshrink`` and
  ``Softshrink``, added later as activations for the ablation points.
- ``non_negative``: the output is never negative (``ReLU``, ``ReLU6``, ``Sigmoid``,
  ``Softplus``, ``Hardsigmoid``), so class selectivity is defined on its units.
- ``pointwise``: the function itself, for the NAD local-prefix shortcut
  (:mod:`lightning_probes.core.nad.local`), given for ``ReLU``, ``Tanh``, ``Sigmoid`` and
  ``Identity`` only.

Identity, flatten, pooling and dropout are foldable too (flatten only from ``start_dim >= 1``,
dropout only in eval mode); identity and dropout also keep each unit apart (``channelwise``,
``passes_units``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_probes.core.modules.ops import LayerOps


class ElementwiseOps(LayerOps):
    """An elementwise activation.

    Args:
        foldable: See :attr:`LayerOps.foldable`.
        pointwise: The function, when the NAD local-prefix shortcut may apply it.
        non_negative: Its output is never negative (see :attr:`LayerOps.non_negative`).
    """

    activation = True

    def __init__(
        self,
        foldable: bool = True,
        pointwise: Callable[[Tensor], Tensor] | None = None,
        *,
        non_negative: bool = False,
    ) -> None:
        self.foldable = foldable
        self.pointwise = pointwise
        self.non_negative = non_negative


def _identity(t: Tensor) -> Tensor:
    return t


ACTIVATIONS: dict[type[nn.Module], ElementwiseOps] = {
    nn.ReLU: ElementwiseOps(pointwise=torch.relu, non_negative=True),
    nn.Tanh: ElementwiseOps(pointwise=torch.tanh),
    nn.Sigmoid: ElementwiseOps(pointwise=torch.sigmoid, non_negative=True),
    **{t: ElementwiseOps(non_negative=True) for t in (nn.ReLU6, nn.Softplus, nn.Hardsigmoid)},
    **{
        t: ElementwiseOps()
        for t in (
            *(nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU),
            *(nn.Mish, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Tanhshrink),
        )
    },
    **{
        t: ElementwiseOps(foldable=False)
        for t in (nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.Hardshrink, nn.Softshrink)
    },
}
"""The elementwise activations, each with what the probes may do with it."""


class IdentityOps(LayerOps):
    """``nn.Identity``."""

    foldable = True
    channelwise = True
    passes_units = True
    pointwise = staticmethod(_identity)


class FlattenOps(LayerOps):
    """``nn.Flatten``: per sample unless it flattens the sample axis."""

    foldable = True

    def per_sample(self, module: nn.Module) -> bool:
        """``start_dim >= 1``: flattening the sample axis would mix the samples."""
        return int(module.start_dim) >= 1  # type: ignore[arg-type]


class PoolOps(LayerOps):
    """Max/average pooling, adaptive or not."""

    foldable = True


class DropoutOps(LayerOps):
    """Dropout: the identity in eval mode, per unit."""

    foldable = True
    channelwise = True
    passes_units = True

    def per_sample(self, module: nn.Module) -> bool:
        """Eval mode only (in train mode the output is random)."""
        return not module.training


POOLS: tuple[type[nn.Module], ...] = (
    *(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    *(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    *(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
)
DROPOUTS: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    *(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
)
"""Dropout types; ``_DropoutNd`` (every dropout, by subclass) for the ablation paths."""
