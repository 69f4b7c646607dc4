r"""Layer types of HF ``transformers``, known by name so the library never imports it.

``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...) is a linear map on the last axis
with the weight stored transposed, ``[in, out]``:

.. math:: z_{\ldots c} = \sum_i a_{\ldots i} W_{ic} + b_c.

Its tangent kernel has the factors of ``nn.Linear`` (inputs and output gradients; a kernel
does not depend on how the parameters are laid out), so it takes the Linear fast path; every
method where the weight's layout enters transposes it. The entries of :data:`HF_LAYER_OPS`
are keyed by ``(module, qualified name)`` of the class and looked up by
:func:`~lightning_probes.core.modules.ops_for` without importing ``transformers``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_probes.core.modules.linear import LinearOps
from lightning_probes.core.modules.ops import LayerOps


def _weight(module: nn.Module) -> Tensor:
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight


class HFConv1DOps(LinearOps):
    """HF ``Conv1D``: ``x @ weight + bias`` with ``weight`` ``[in, out]``; last-axis units."""

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``x @ weight + bias`` on ``[..., in]`` (``weight`` ``[in, out]``)."""
        return super().apply(module, x, weight.t(), bias)

    def unit_contributions(
        self, module: nn.Module, d: Tensor, out_shape: tuple[int, ...]
    ) -> Tensor:
        r""":math:`P_c = d_{\cdot c} W_{c \cdot}`, ``[u, n, ..., out]``."""
        weight = _weight(module)
        u, o = weight.shape
        return d.movedim(-1, 0).unsqueeze(-1) * weight.reshape(u, *([1] * (d.ndim - 1)), o)

    def select_outputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """Columns ``idx`` of ``[in, out]``."""
        return weight.index_select(1, idx)

    def select_inputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """Rows ``idx`` of ``[in, out]``."""
        return weight.index_select(0, idx)

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """``z [P, n, ..., in] @ weight [P, in, out] + bias [P, out]``."""
        x = z.reshape(z.shape[0], -1, z.shape[-1])
        out = torch.baddbmm(w["bias"][:, None], x, w["weight"]) if "bias" in w else x @ w["weight"]
        return out.reshape(*z.shape[:-1], -1)

    def accepts_input(self, module: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """Never: the NAD first-layer shortcut reads an ``[out, in]`` weight (full forward)."""
        return False


HF_LAYER_OPS: dict[tuple[str, str], LayerOps] = {
    ("transformers.pytorch_utils", "Conv1D"): HFConv1DOps(),
}
"""Registry entries of HF layer types by ``(class.__module__, class.__qualname__)``."""

__all__ = ["HF_LAYER_OPS", "HFConv1DOps"]
