r"""Layer types of HF ``transformers``, registered lazily (never imported by the library).

``transformers`` is not a dependency: its entries are added to the registry the first time a
lookup happens while ``transformers.pytorch_utils`` / ``transformers.activations`` are
already imported (a user who builds a HF model has imported them). Then:

- ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) is a linear layer with its weight
  stored ``[in, out]`` (:class:`~lightning_probes.core.modules.linear.TransposedLinearOps`);
  its units are the features of the last axis.
- the activation modules of ``transformers.activations`` (``GELUActivation``,
  ``NewGELUActivation``, ``FastGELUActivation``, ``QuickGELUActivation``, ...) are elementwise
  activations (ablation points follow a layer to them), ``ReLUSquaredActivation``,
  ``LaplaceActivation`` and ``SqrtSoftplusActivation`` with non-negative outputs;
  ``LinearActivation`` is the identity.

They are not foldable into the landscape chain (kept on its general path).
"""

from __future__ import annotations

import sys

from torch import nn

from lightning_probes.core.modules.elementwise import ElementwiseOps, IdentityOps
from lightning_probes.core.modules.linear import TransposedLinearOps
from lightning_probes.core.modules.ops import LayerOps

SIGNED_ACTIVATIONS = (
    *("GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation"),
    *("ClippedGELUActivation", "AccurateGELUActivation", "GELUTanh", "PytorchGELUTanh"),
    *("MishActivation", "SiLUActivation", "XIELUActivation"),
)
"""Activations of ``transformers.activations`` whose output can be negative."""
NON_NEGATIVE_ACTIVATIONS = ("ReLUSquaredActivation", "LaplaceActivation", "SqrtSoftplusActivation")
"""Activations of ``transformers.activations`` whose output is never negative."""


def entries(module_name: str) -> dict[type[nn.Module], LayerOps]:
    """The registry entries that ``transformers`` submodule ``module_name`` provides.

    Args:
        module_name: ``"transformers.pytorch_utils"`` or ``"transformers.activations"``,
            looked up in ``sys.modules`` only (never imported here).

    Returns:
        ``{layer type: ops}``; empty when the submodule is not imported. Names missing from
        the installed version are skipped.
    """
    mod = sys.modules.get(module_name)
    if mod is None:
        return {}
    names: dict[str, LayerOps] = {}
    if module_name == "transformers.pytorch_utils":
        names["Conv1D"] = TransposedLinearOps()
    elif module_name == "transformers.activations":
        names.update({n: ElementwiseOps(foldable=False) for n in SIGNED_ACTIVATIONS})
        names.update(
            {n: ElementwiseOps(foldable=False, non_negative=True) for n in NON_NEGATIVE_ACTIVATIONS}
        )
        names["LinearActivation"] = IdentityOps()
    out: dict[type[nn.Module], LayerOps] = {}
    for name, ops in names.items():
        t = getattr(mod, name, None)
        if isinstance(t, type) and issubclass(t, nn.Module):
            out[t] = ops
    return out


MODULES = ("transformers.pytorch_utils", "transformers.activations")
"""The ``transformers`` submodules whose layer types join the registry."""
