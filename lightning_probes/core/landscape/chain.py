r"""A network as a chain of known layers, found by tracing one sample through it.

Used by :mod:`lightning_probes.core.landscape.affine` to evaluate many weight points at once
layer by layer: that is only exact when the network's forward is nothing but the composition
of the layers it calls, each of a type whose computation is known: registered in
:mod:`lightning_probes.core.modules` as ``foldable`` (parameter-free, per sample) or
``jointly_affine``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import slice_rows
from lightning_probes.core.modules import ops_for


@dataclass
class Link:
    """One layer of a traced chain.

    Attributes:
        module: The layer.
        names: ``{local parameter name: model parameter name}`` of its parameters.
        width: Output elements per sample.
    """

    module: nn.Module
    names: dict[str, str]
    width: int


def trace_chain(model: nn.Module, inputs: Any) -> list[Link] | None:
    """The model as a chain of supported layers, or ``None`` when it is not one.

    One sample is run through ``model`` with hooks on its leaf modules. The model is a chain
    when every leaf module called takes exactly the previous one's output (the same tensor,
    not modified in place in between; the first takes the model input) and the model returns
    the last one's output: then ``model(x)`` is the composition of those layers. Every layer
    must be a supported type (exactly, not a subclass), carry no hooks, and be in eval mode
    where that matters (dropout, BatchNorm on running statistics).

    Args:
        model: The network.
        inputs: Probe inputs ``[n, ...]`` (a single tensor; anything else gives ``None``).
    """
    if not isinstance(inputs, Tensor) or _has_global_hooks():
        return None
    names = {m: name for name, m in model.named_modules()}
    calls: list[list[Any]] = []  # [module, input, input version, output, output version]

    def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        arg = args[0] if len(args) == 1 and not kwargs else None
        calls.append([m, arg, getattr(arg, "_version", None), None, None])

    def post(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        calls[-1][3:] = [out, getattr(out, "_version", None)]

    leaves = [m for m in model.modules() if not list(m.children())]
    if any(m._forward_hooks or m._forward_pre_hooks for m in leaves):
        return None
    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in leaves]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in leaves]
    sample = slice_rows(inputs, 0, 1)
    try:
        with torch.no_grad():
            result = model(sample)
    finally:
        for h in handles:
            h.remove()
    prev, version = sample, sample._version
    chain = []
    for m, arg, arg_version, out, out_version in calls:
        if arg is not prev or arg_version != version or not _supported(m) or m not in names:
            return None
        if not isinstance(out, Tensor):
            return None
        prefix = f"{names[m]}." if names[m] else ""
        local = {k: prefix + k for k, p in m._parameters.items() if p is not None}
        chain.append(Link(m, local, max(1, out.numel())))
        prev, version = out, out_version
    if not chain or result is not prev or result._version != version:
        return None
    return chain


def _supported(m: nn.Module) -> bool:
    """Whether the chain can evaluate ``m`` at many weight points at once.

    Its exact type must be registered (a subclass may override forward), treat each sample
    alone in its current mode, and either fold points into the batch (parameter-free) or be
    affine in its parameters jointly.
    """
    ops = ops_for(m, exact=True)
    if ops is None or not ops.per_sample(m):
        return False  # e.g. batch statistics, dropout in train mode, flattening the samples
    if ops.foldable:
        return not m._parameters and not m._buffers
    return ops.jointly_affine


def _has_global_hooks() -> bool:
    from torch.nn.modules import module as mod

    names = ("_global_forward_hooks", "_global_forward_pre_hooks")
    return any(bool(getattr(mod, n, None)) for n in names)
