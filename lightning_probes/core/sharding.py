"""Sharded models (FSDP2, ``DTensor``): whole weights for probes that need them.

Under FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) every parameter is a ``DTensor``
holding one shard per rank outside ``forward``; FSDP's forward hooks gather the shards into
whole tensors for the duration of each forward and free them after. A probe that evaluates the
model at *other* weights (``torch.func.functional_call``: LCA, the landscape's planes), copies
it (NAD's fresh networks) or measures norms would meet the shards: FSDP's hooks replace the
weights ``functional_call`` set, ``deepcopy`` is refused, and a norm of the local shard is a
rank-local, silently wrong number.

So under FSDP2 the probes run on an **unsharded replica**
(:func:`unsharded_replica`): the same module tree with FSDP's wrapper classes and hooks left
out, each parameter gathered whole (:meth:`DTensor.full_tensor`), buffers shared. On it every
probe runs exactly the code path of a single process and gives the same values as under DDP.
The gather is a collective: every rank must build the replica at the same point, in the same
order (the probes run at the same steps on every rank). Memory: one whole copy of the
weights per rank while a probe runs, so the model must fit on one device for probing.

Tensor parallelism (``DTensor`` parameters that ``fully_shard`` did not create, or FSDP over
them) is refused by :func:`check_unshardable`: a tensor-parallel forward may depend on the
sharding (per-rank head counts, collectives in ``forward``), so a gathered copy is not known to
compute the same function.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_unshardable", "full_parameters", "is_sharded", "unsharded_replica"]

# dicts of hooks an nn.Module keeps by handle id (the *_with_kwargs / always_called ones are
# keyed by the same ids)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_HOOK_FLAGS = {
    "_forward_pre_hooks_with_kwargs": "_forward_pre_hooks",
    "_forward_hooks_with_kwargs": "_forward_hooks",
    "_forward_hooks_always_called": "_forward_hooks",
}
# attributes fully_shard sets on the modules it manages
_FSDP_MARKERS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_module_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _is_dtensor(t: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded: a ``DTensor`` parameter, or a module ``fully_shard`` wraps.

    The second case covers the moments when FSDP2 has registered gathered, plain parameters
    (between an ``unshard`` and the next reshard): its hooks are still there.

    Example:
        >>> is_sharded(nn.Linear(2, 3))
        False
    """
    fsdp = _fsdp_module_type()
    return any(_is_dtensor(p) for p in model.parameters()) or (
        fsdp is not None and any(isinstance(m, fsdp) for m in model.modules())
    )


def _full(t: Tensor) -> Tensor:
    """``t`` whole and detached: a gathered copy for a ``DTensor`` (collective), else a view."""
    if _is_dtensor(t):
        return t.detach().full_tensor()  # type: ignore[attr-defined]
    return t.detach()


def full_parameters(model: nn.Module, *, trainable_only: bool = True) -> dict[str, Tensor]:
    """``{name: whole, detached parameter}``, gathering the shards of ``DTensor`` parameters.

    For a model without ``DTensor`` parameters these are detached views of the parameters
    (no copy). For ``DTensor`` ones each is gathered into a new, whole tensor: a collective,
    which every rank must call at the same point.

    Args:
        model: The network (plain, or sharded by ``fully_shard``).
        trainable_only: Only the parameters with ``requires_grad``.

    Returns:
        ``{name: tensor}`` in ``named_parameters()`` order, with the parameters' full shapes.

    Example:
        >>> {k: tuple(v.shape) for k, v in full_parameters(nn.Linear(2, 3)).items()}
        {'weight': (3, 2), 'bias': (3,)}
    """
    return {
        k: _full(p) for k, p in model.named_parameters() if p.requires_grad or not trainable_only
    }


def check_unshardable(model: nn.Module) -> None:
    """Raise unless every ``DTensor`` parameter of ``model`` is one ``fully_shard`` created.

    Args:
        model: The network.

    Raises:
        ValueError: Naming the parameters that are tensor-parallel ``DTensor`` s (not managed
            by ``fully_shard``, or FSDP applied over tensor-parallel ones).
    """
    dtensors = {id(p): name for name, p in model.named_parameters() if _is_dtensor(p)}
    if not dtensors:
        return
    managed = _fsdp_parameters(model)
    bad = [name for i, name in dtensors.items() if not managed.get(i, False)]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"Expected the model's DTensor parameters to be sharded by FSDP2 (`fully_shard`) "
            f"alone, got tensor-parallel parameters ({shown}). The probes evaluate a gathered, "
            "unsharded copy of the model, which a tensor-parallel forward need not match. "
            "Probe with FSDP2 only (`ModelParallelStrategy(tensor_parallel_size=1)`) or DDP."
        )


def _fsdp_parameters(model: nn.Module) -> dict[int, bool]:
    """``{id(parameter): created by fully_shard from a plain tensor}`` for FSDP2's parameters."""
    fsdp = _fsdp_module_type()
    out: dict[int, bool] = {}
    for module in model.modules():
        if fsdp is None or not isinstance(module, fsdp):
            continue
        state = module._get_fsdp_state()  # type: ignore[operator]
        for group in getattr(state, "_fsdp_param_groups", []) or []:
            for param in group.fsdp_params:
                out[id(param.sharded_param)] = not param.is_dtensor
    return out


def unsharded_replica(model: nn.Module) -> nn.Module:
    """The same module tree with whole parameters and without FSDP: what a probe runs on.

    Every module is a new object of its own class (FSDP's wrapper class ``FSDP<Class>``
    stripped) sharing the original's attributes and **buffers** (not sharded by FSDP2), with
    each parameter gathered whole (a new ``nn.Parameter`` with the same ``requires_grad``;
    one per original parameter, so tied weights stay tied) and without the hooks that
    ``torch.distributed`` registered (FSDP's gathers and reshards); the user's own hooks are
    kept. The original model is not modified.

    Args:
        model: The network, sharded by ``fully_shard`` or not.

    Returns:
        An ``nn.Module`` computing the unsharded model's function; ``model`` itself if
        :func:`is_sharded` is false.

    Raises:
        ValueError: For tensor-parallel parameters (:func:`check_unshardable`).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3))
        >>> unsharded_replica(net) is net
        True
    """
    if not is_sharded(model):
        return model
    check_unshardable(model)
    return _replica(model, {}, {})


def _replica(module: nn.Module, params: dict[int, Any], modules: dict[int, nn.Module]) -> Any:
    if id(module) in modules:  # a submodule registered twice: one replica
        return modules[id(module)]
    cls = _unwrapped_class(type(module))
    new = cls.__new__(cls)
    modules[id(module)] = new
    state = {
        k: v
        for k, v in module.__dict__.items()
        if not k.startswith("__composable_api_state_key") and k not in _FSDP_MARKERS
    }
    for name in _HOOK_DICTS:
        if name in state:
            state[name] = OrderedDict(
                (k, h) for k, h in state[name].items() if not _from_torch_distributed(h)
            )
    for name, owner in _HOOK_FLAGS.items():
        if name in state:
            kept = state[owner]
            state[name] = type(state[name])((k, v) for k, v in state[name].items() if k in kept)
    state["_parameters"] = {
        name: None if p is None else _whole_parameter(p, params)
        for name, p in module._parameters.items()
    }
    state["_buffers"] = dict(module._buffers)
    state["_modules"] = {
        name: None if child is None else _replica(child, params, modules)
        for name, child in module._modules.items()
    }
    new.__dict__.update(state)
    return new


def _whole_parameter(p: Tensor, memo: dict[int, Any]) -> nn.Parameter:
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(_full(p), requires_grad=p.requires_grad)
    return memo[id(p)]


def _unwrapped_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` without FSDP's dynamic wrapper (``FSDPLinear(FSDPModule, Linear)`` -> Linear)."""
    fsdp = _fsdp_module_type()
    while fsdp is not None and issubclass(cls, fsdp) and cls is not fsdp:
        bases = [b for b in cls.__bases__ if issubclass(b, nn.Module) and not issubclass(b, fsdp)]
        if len(bases) != 1:
            break
        cls = bases[0]
    return cls


def _from_torch_distributed(hook: Any) -> bool:
    """Whether a hook was registered by ``torch.distributed`` (FSDP, tensor parallelism)."""
    fn = getattr(hook, "func", hook)  # functools.partial
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("torch.distributed.")
