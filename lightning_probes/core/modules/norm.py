r"""Normalisation layers: ``BatchNorm`` (eval mode), ``LayerNorm``, ``GroupNorm``, instance norm.

All keep the unit layout of their input, so an ablation point moves past them to the
activation. In eval mode ``BatchNorm`` is a per-channel affine map on running statistics,
:math:`\gamma_c (x - \mu_c) / \sqrt{\sigma_c^2 + \epsilon} + \beta_c`, and ``LayerNorm`` an
affine map of the normalised input, :math:`\gamma \odot \hat x + \beta`: both are affine in
their parameters jointly (landscape planes). ``BatchNorm`` acts on each channel separately;
``LayerNorm``, ``GroupNorm`` and instance norm mix the units they normalise together.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_probes.core.modules.ops import LayerOps


def _per_point_affine(y: Tensor, w: dict[str, Tensor], ones: tuple[int, int]) -> Tensor:
    """``y * weight + bias`` with per-point parameters ``[P, *shape]``.

    The parameters are viewed as ``[P, 1 * ones[0], *shape, 1 * ones[1]]``.
    """
    for k, op in (("weight", torch.mul), ("bias", torch.add)):
        if k in w:
            p = w[k]
            y = op(y, p.view(p.shape[0], *(1,) * ones[0], *p.shape[1:], *(1,) * ones[1]))
    return y


class NormOps(LayerOps):
    """A normalisation layer the probes only pass through (``GroupNorm``, instance norm)."""

    passes_units = True


class BatchNormOps(NormOps):
    """``BatchNorm1d/2d/3d``: per channel, on running statistics in eval mode."""

    channelwise = True
    jointly_affine = True

    def per_sample(self, module: nn.Module) -> bool:
        """Only in eval mode with running statistics (else batch statistics mix samples)."""
        return not module.training and module.running_mean is not None

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """Running statistics, then the per-point affine ``[P, 1, C, 1..]``."""
        m: Any = module
        y = F.batch_norm(z.flatten(0, 1), m.running_mean, m.running_var, eps=m.eps).view_as(z)
        return _per_point_affine(y, w, (1, z.ndim - 3))


class LayerNormOps(NormOps):
    """``LayerNorm`` over the trailing ``normalized_shape``."""

    jointly_affine = True

    def moves_samples(self, module: nn.Module, axis: int, ndim: int) -> bool:
        """Any axis before the normalised ones: each position is normalised alone."""
        m: Any = module
        return 0 <= axis < ndim - len(m.normalized_shape)

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """Normalise, then the per-point affine ``[P, 1.., *normalized_shape]``."""
        m: Any = module
        y = F.layer_norm(z, m.normalized_shape, None, None, m.eps)
        return _per_point_affine(y, w, (z.ndim - 1 - len(m.normalized_shape), 0))
