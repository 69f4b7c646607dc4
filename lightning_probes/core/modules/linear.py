r"""Layers that are a linear map on the last axis: ``nn.Linear`` and HF ``Conv1D``.

:math:`z_{\ldots c} = \sum_i W_{ci}\, a_{\ldots i} + b_c` for inputs of any leading shape
(``[n, i]`` or a sequence ``[n, T, i]``); the features of the last axis are the units (over a
sequence a unit's activity is averaged over positions, as a conv map is over space, and
ablating it zeroes it at every position).
HF ``transformers.pytorch_utils.Conv1D`` computes the same map with the weight stored
transposed (``[in, out]``, :math:`z = a W + b`): :class:`TransposedLinearOps` overrides the
methods where the weight's layout enters (registered lazily, see
:mod:`lightning_probes.core.modules.hf`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_probes.core.modules.ops import InputColumns, LayerOps

NARROW_OUTPUTS = 32
"""Linear layers with fewer outputs run output-major in the landscape planes (see
:meth:`LinearOps.per_point_forward`)."""


def _weight(module: nn.Module) -> Tensor:
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight


class LinearOps(LayerOps):
    """``nn.Linear``: a dense map on the last axis, whose features are the units."""

    unit_dim = -1
    jointly_affine = True
    default_layer = True

    def moves_samples(self, module: nn.Module, axis: int, ndim: int) -> bool:
        """Any axis but the last (features): every position is mapped alone."""
        return 0 <= axis < ndim - 1

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ weight.T + bias`` on ``[..., in]``."""
        return F.linear(x, weight, bias)

    def kernel_factors(
        self, module: nn.Module, x: Tensor, grads: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Inputs ``[n, T, 1, in]`` and output gradients ``[o, n, T, 1, out]``.

        ``T``: every leading position of the input, summed over in the kernel.
        """
        o, n = grads.shape[:2]
        feats = x.reshape(n, -1, 1, x.shape[-1])
        return feats, grads.reshape(o, n, -1, 1, grads.shape[-1])

    def flat_kernel(self, module: nn.Module) -> bool:
        """Eq. (9) of Lou et al. 2022 holds for every ``Linear`` on flat inputs."""
        return True

    def accepts_units(self, module: nn.Module, unit_dim: int, ndim: int) -> bool:
        """Units on the last axis (or the features of a flat ``[n, u]`` input)."""
        return unit_dim == -1 or ndim == 2

    def unit_contributions(
        self, module: nn.Module, d: Tensor, out_shape: tuple[int, ...]
    ) -> Tensor:
        r""":math:`P_c = d_{\cdot c} W_{\cdot c}^\top`, ``[u, n, ..., out]``."""
        weight = _weight(module)
        u, o = weight.shape[1], weight.shape[0]
        w = weight.t().reshape(u, *([1] * (d.ndim - 1)), o)
        return d.movedim(-1, 0).unsqueeze(-1) * w

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """One batched matmul over the points ``P``: ``z [P, n, ..., in] -> [P, n, ..., out]``."""
        x, weight = z.reshape(z.shape[0], -1, z.shape[-1]), w["weight"]
        if w["weight"].shape[1] < NARROW_OUTPUTS:  # [P, o, N] then a transposed view: a narrow
            # head's GEMM and the softmax over its outputs run faster along the long sample axis
            xt = x.transpose(1, 2)
            out = torch.baddbmm(w["bias"][..., None], weight, xt) if "bias" in w else weight @ xt
            out = out.transpose(1, 2)
        else:
            wt = weight.transpose(1, 2)
            out = torch.baddbmm(w["bias"][:, None], x, wt) if "bias" in w else x @ wt
        return out.reshape(*z.shape[:-1], -1)

    def accepts_input(self, module: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """A flat input of ``in_features`` elements."""
        return len(input_shape) == 1 and input_shape[0] == _weight(module).shape[1]

    def input_columns(self, module: nn.Module, input_shape: tuple[int, ...]) -> InputColumns:
        """Column ``i`` of the weight meets input ``i`` at the one position ``l = 0``."""
        d = math.prod(input_shape)
        pix = torch.arange(d, device="cpu")  # index tensors: built here, moved by the caller
        out_shape = (int(_weight(module).shape[0]),)
        return pix, pix.clone(), torch.zeros(d, dtype=torch.long, device="cpu"), 1, out_shape


class TransposedLinearOps(LinearOps):
    """HF ``Conv1D``: ``x @ weight + bias`` with ``weight`` stored ``[in, out]``.

    The map, its units and its kernel factors are those of :class:`LinearOps`; only the
    methods that read the weight's layout differ.
    """

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ weight + bias`` on ``[..., in]`` (``weight`` ``[in, out]``)."""
        return F.linear(x, weight.t(), bias)

    def unit_contributions(
        self, module: nn.Module, d: Tensor, out_shape: tuple[int, ...]
    ) -> Tensor:
        r""":math:`P_c = d_{\cdot c} W_{c \cdot}`, ``[u, n, ..., out]``."""
        weight = _weight(module)
        u, o = weight.shape
        w = weight.reshape(u, *([1] * (d.ndim - 1)), o)
        return d.movedim(-1, 0).unsqueeze(-1) * w

    def select_outputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """Columns ``idx`` of ``[in, out]``."""
        return weight.index_select(1, idx)

    def select_inputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of ``[in, out]``."""
        return weight.index_select(0, idx)

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """:meth:`LinearOps.per_point_forward` with each point's weight transposed."""
        return super().per_point_forward(module, {**w, "weight": w["weight"].transpose(1, 2)}, z)

    def accepts_input(self, module: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """``False``: the NAD first-layer shortcut reads the weight as ``[out, in]``."""
        return False
