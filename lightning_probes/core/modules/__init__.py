r"""The layer-type registry: what each probe needs of a layer, found by the layer's type.

In the spirit of BackPACK's per-layer extensions with dictionary dispatch: every layer family
has one module here stating, in a :class:`LayerOps` entry, its unit (feature/channel) axis, its
tangent-kernel factors, the affine map the landscape planes and the NAD first-layer shortcut
use, and its unit-ablation contributions (:mod:`~lightning_probes.core.modules.linear`,
:mod:`~lightning_probes.core.modules.hf` for HF ``Conv1D`` and activations, registered lazily,
:mod:`~lightning_probes.core.modules.conv`, :mod:`~lightning_probes.core.modules.norm`,
:mod:`~lightning_probes.core.modules.embedding`,
:mod:`~lightning_probes.core.modules.elementwise`,
:mod:`~lightning_probes.core.modules.attention` for ``nn.MultiheadAttention`` as one layer).
The probes dispatch through :func:`ops_for`, never on ``isinstance`` chains; a layer type
without an entry takes each probe's general path (e.g. per-sample gradients with
:mod:`torch.func` for its kernel).

A user's own layer type joins with :func:`register`::

    >>> import torch
    >>> from torch import nn
    >>> from lightning_probes.core.modules import LinearOps, ops_for, register, unregister
    >>> class Dense(nn.Module):  # a linear map on the last axis, weight [out, in]
    ...     def __init__(self, i, o):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.randn(o, i))
    ...         self.bias = nn.Parameter(torch.zeros(o))
    ...     def forward(self, x):
    ...         return x @ self.weight.T + self.bias
    >>> register(Dense, LinearOps())
    >>> ops_for(Dense(3, 2)).unit_dim
    -1
    >>> unregister(Dense)
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from lightning_probes.core.modules import hf
from lightning_probes.core.modules.attention import AttentionOps
from lightning_probes.core.modules.conv import CONV_TYPES, ConvOps, conv_patches
from lightning_probes.core.modules.elementwise import (
    ACTIVATIONS,
    DROPOUTS,
    POOLS,
    DropoutOps,
    ElementwiseOps,
    FlattenOps,
    IdentityOps,
    PoolOps,
)
from lightning_probes.core.modules.embedding import EmbeddingOps
from lightning_probes.core.modules.linear import LinearOps, TransposedLinearOps
from lightning_probes.core.modules.norm import BatchNormOps, LayerNormOps, NormOps
from lightning_probes.core.modules.ops import InputColumns, LayerOps, unit_axis

_REGISTRY: dict[type[nn.Module], LayerOps] = {}
_PENDING = set(hf.MODULES)  # transformers submodules whose types have not joined yet


def _register_pending() -> None:
    """Add the entries of HF ``transformers`` submodules imported since the last lookup.

    A type the user registered already keeps the user's entry.
    """
    for name in [m for m in _PENDING if m in sys.modules]:
        _PENDING.discard(name)
        for t, ops in hf.entries(name).items():
            _REGISTRY.setdefault(t, ops)


def register(layer_type: type[nn.Module], ops: LayerOps) -> None:
    """Declare what the probes need of ``layer_type`` (and of its subclasses).

    An entry for a type already registered replaces it. Lookups by :func:`ops_for` walk the
    module's method resolution order, so a subclass uses its closest registered base; the
    shortcuts that need the exact computation of a type (the landscape chain, the NAD
    shortcuts) look up the exact type only.

    Args:
        layer_type: A subclass of :class:`torch.nn.Module`.
        ops: A :class:`LayerOps` (e.g. ``LinearOps()`` for a linear map on the last axis
            with weight ``[out, in]``, ``ConvOps(2)`` for a ``Conv2d``-like layer).

    Raises:
        TypeError: If ``layer_type`` is not a module type or ``ops`` not a :class:`LayerOps`.

    Example:
        >>> from lightning_probes.core.modules import LinearOps, ops_for, register, unregister
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> register(MyLinear, LinearOps())
        >>> ops_for(MyLinear(2, 3), exact=True) is not None
        True
        >>> unregister(MyLinear)
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(
            f"Expected `layer_type` to be a subclass of torch.nn.Module, got {layer_type!r}."
        )
    if not isinstance(ops, LayerOps):
        raise TypeError(
            f"Expected `ops` to be a LayerOps instance (e.g. LinearOps()), got "
            f"{type(ops).__name__}. Subclass lightning_probes.core.modules.LayerOps."
        )
    _REGISTRY[layer_type] = ops


def unregister(layer_type: type[nn.Module]) -> None:
    """Remove ``layer_type``'s entry (a no-op if it has none)."""
    _REGISTRY.pop(layer_type, None)


def ops_for(module: nn.Module, *, exact: bool = False) -> LayerOps | None:
    """The registry entry of ``module``'s type, or ``None`` when the probes know no entry.

    Args:
        module: A layer.
        exact: Match ``type(module)`` only; by default the closest registered class in its
            method resolution order (a subclass of ``nn.Linear`` is a linear layer).

    Returns:
        The :class:`LayerOps`, or ``None`` (each probe then takes its general path).

    Raises:
        TypeError: If ``module`` is not an :class:`torch.nn.Module` instance.

    Example:
        >>> ops_for(nn.Conv2d(1, 2, 3)).unit_dim, ops_for(nn.Softmax()) is None
        (1, True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected an nn.Module instance, got {type(module).__name__}.")
    if _PENDING:
        _register_pending()
    if exact:
        return _REGISTRY.get(type(module))
    for cls in type(module).__mro__:
        ops = _REGISTRY.get(cls)
        if ops is not None:
            return ops
    return None


_GENERAL = LayerOps()  # a layer type without an entry


def layer_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the layer ``module`` (see :meth:`LayerOps.layer_parameters`).

    Its own parameters, or for a type whose entry says so all of its block's
    (``nn.MultiheadAttention``: ``in_proj_weight``, ..., ``out_proj.weight``).

    Example:
        >>> list(layer_parameters(nn.MultiheadAttention(4, 2)))
        ['in_proj_weight', 'in_proj_bias', 'out_proj.weight', 'out_proj.bias']
    """
    return (ops_for(module) or _GENERAL).layer_parameters(module)


def layer_output(module: nn.Module, output: Any) -> Any:
    """The tensor the probes read from ``module``'s ``output`` (:attr:`LayerOps.output_index`).

    ``output`` itself, or e.g. the attention output ``output[0]`` of ``nn.MultiheadAttention``;
    anything that is not a tuple is returned as is (for the caller to refuse).
    """
    index = (ops_for(module) or _GENERAL).output_index
    if index is None or not isinstance(output, tuple) or len(output) <= index:
        return output
    return output[index]


def with_layer_output(module: nn.Module, output: Any, tensor: Tensor) -> Any:
    """``output`` with the tensor :func:`layer_output` reads replaced by ``tensor``."""
    index = (ops_for(module) or _GENERAL).output_index
    if index is None or not isinstance(output, tuple) or len(output) <= index:
        return tensor
    return (*output[:index], tensor, *output[index + 1 :])


def _register_builtins() -> None:
    register(nn.Linear, LinearOps())
    for k, t in enumerate(CONV_TYPES, start=1):
        register(t, ConvOps(k))
    batch_norm = BatchNormOps()
    for t in (nn.modules.batchnorm._BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        register(t, batch_norm)
    register(nn.modules.batchnorm._NormBase, NormOps())  # instance norm, by subclass
    register(nn.GroupNorm, NormOps())
    register(nn.LayerNorm, LayerNormOps())
    register(nn.Embedding, EmbeddingOps())
    register(nn.MultiheadAttention, AttentionOps())
    for t, ops in ACTIVATIONS.items():
        register(t, ops)
    register(nn.Identity, IdentityOps())
    register(nn.Flatten, FlattenOps())
    for t in POOLS:
        register(t, PoolOps())
    for t in DROPOUTS:
        register(t, DropoutOps())


_register_builtins()

__all__ = [
    "CONV_TYPES",
    "AttentionOps",
    "BatchNormOps",
    "ConvOps",
    "DropoutOps",
    "ElementwiseOps",
    "EmbeddingOps",
    "FlattenOps",
    "IdentityOps",
    "InputColumns",
    "LayerNormOps",
    "LayerOps",
    "LinearOps",
    "NormOps",
    "PoolOps",
    "TransposedLinearOps",
    "conv_patches",
    "layer_output",
    "layer_parameters",
    "ops_for",
    "register",
    "unit_axis",
    "unregister",
    "with_layer_output",
]
