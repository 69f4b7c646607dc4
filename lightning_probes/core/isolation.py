"""Run a probe on a model without changing the training it observes.

A probe may run forward and backward passes, switch modes, draw random numbers and register
hooks. :func:`isolated` guarantees that afterwards the model and the process are exactly as
before: train/eval mode of every submodule, ``requires_grad`` flags, ``.grad`` tensors (the
same objects, untouched), buffers (BatchNorm running statistics), hooks, and the CPU, CUDA,
NumPy and Python RNG states. Inside it, TF32 is off and the GPU kernels are ones that
support probes (:mod:`~lightning_probes.core.backends`), and the model computes in float32 or
wider whatever precision it trains in (:func:`~lightning_probes.core.precision.widened`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_probes.core.backends import probe_backends
from lightning_probes.core.precision import widened

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextmanager
def isolated(
    model: nn.Module, *, grad: bool = True, eval_mode: bool = True, widen: bool = True
) -> Iterator[None]:
    """Scope in which a probe may use ``model`` freely; everything is restored on exit.

    Args:
        model: The observed network.
        grad: Run the scope under :func:`torch.enable_grad` (``True``) or
            :func:`torch.no_grad` (``False``).
        eval_mode: Put the model in ``eval()`` mode inside the scope (dropout off, BatchNorm on
            running statistics); the original mode of every submodule is restored on exit.
        widen: Make bfloat16/float16 parameters and buffers float32 inside the scope (the
            same values; :func:`~lightning_probes.core.precision.widened`), so that probes
            compute in float32 under ``precision="bf16-true"``/``"16-true"``.

    Yields:
        Nothing. Inside the scope ``.grad`` of every parameter is ``None`` (a probe calling
        ``backward`` does not accumulate into the training gradients), autocast is off, so
        probes compute in the parameters' dtype, TF32 is off and cuDNN (models with an RNN)
        and the attention kernels are chosen as
        :func:`~lightning_probes.core.backends.probe_backends` says, and every
        ``torch.compile``-d submodule runs its original eager module (so the probe's hooks fire
        and no recompilation is triggered).
        ``backward`` does not accumulate into the training gradients), autocast is off (under
        ``"bf16-mixed"``/``"16-mixed"`` the float32 weights compute in float32), narrow
        weights are widened to float32 (with ``widen``), and every ``torch.compile``-d
        submodule runs its original eager module (so the probe's hooks fire and no
        recompilation is triggered).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with isolated(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    # a forward that re-binds a buffer (`self.calls = self.calls + 1`) replaces the tensor in
    # the module's `_buffers`, so the bindings are restored as well as the values
    bindings = [(m, dict(m._buffers)) for m in model.modules()]
    hook_keys = [
        (m, {name: set(getattr(m, name, {})) for name in _HOOK_DICTS}) for m in model.modules()
    ]
    compiled = _eager_compiled_submodules(model)
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    np_rng = np.random.get_state()
    py_rng = random.getstate()
    try:
        for p in params:
            p.grad = None
        if eval_mode:
            model.eval()
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
            for device_type in ("cpu", "cuda"):
                if device_type == "cpu" or torch.cuda.is_available():
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
            stack.enter_context(probe_backends(rnn=rnn))
            if widen:
                stack.enter_context(widened(model))
            yield
    finally:
        for m, forward in compiled:
            m.forward = forward
        for m, mode in modes:
            m.training = mode
        for p, req, g in zip(params, requires, grads):
            p.requires_grad_(req)
            p.grad = g
        for m, bound in bindings:
            m._buffers.clear()
            m._buffers.update(bound)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, keys in hook_keys:
            for name, before in keys.items():
                hooks = getattr(m, name, None)
                if hooks is None:
                    continue
                for key in [k for k in hooks if k not in before]:
                    del hooks[key]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def _eager_compiled_submodules(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Point each ``torch.compile``-d forward in ``model`` at the eager one; return the undo.

    ``OptimizedModule.forward`` is an instance attribute wrapping ``_orig_mod.__call__`` in
    dynamo; hooks a probe registers on modules inside would not fire in the cached graph.
    Duck-typed so that importing this module does not import dynamo.
    """
    undo = []
    for m in model.modules():
        if "forward" not in m.__dict__:
            continue
        eager: Any = None
        original = getattr(m, "_orig_mod", None)
        if type(m).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
            eager = original.__call__
        # Lightning's `from_compiled` (trainer.fit(torch.compile(module))) wraps the module's
        # own forward in dynamo and keeps the original here.
        ctx = getattr(m, "_compiler_ctx", None)
        if isinstance(ctx, dict) and callable(ctx.get("original_forward")):
            eager = ctx["original_forward"]
        if eager is not None:
            undo.append((m, m.__dict__["forward"]))
            m.forward = eager  # type: ignore[method-assign]
    return undo
