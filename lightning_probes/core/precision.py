r"""Probes compute in float32 or wider, whatever precision the model trains in.

Under ``Trainer(precision="bf16-true")`` or ``"16-true"`` Lightning casts the module's
parameters and floating buffers to bfloat16 / float16, and the training batches with them. A
probe's quantities do not survive that arithmetic: bfloat16 resolves a loss near 1 to steps of
:math:`2^{-7} = 0.0078`, so LCA's loss change of one step (about :math:`10^{-3}`) would be
noise, and a probe set drawn in float32 does not even meet bfloat16 weights in a matrix
product ("mat1 and mat2 must have the same dtype").

:func:`widened` is the scope in which a probe evaluates such a model (entered by
:func:`~lightning_probes.core.isolation.isolated`): every parameter and floating buffer
narrower than float32 is replaced by a float32 copy. The values are the trained weights
exactly (every bfloat16 and float16 number is a float32 number); only the arithmetic is wider.
On exit the original tensors are put back, untouched: same objects, same dtype, same values.
Floating probe inputs are cast to the :func:`computation_dtype` (:func:`cast_inputs`).
Weights already in float32 or float64 are left as they are, so a float32 model is probed
exactly as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet, map_tensors, slice_rows
from lightning_probes.core.evaluation import OutputFn, as_logits, call_model

_TRAINED: dict[int, Tensor] = {}
"""``id(float32 copy) -> the original parameter, detached`` while widened (see
:func:`trained_parameters`); entries live exactly as long as their :func:`widened` scope."""


def is_narrow(t: Tensor) -> bool:
    """Whether ``t`` is floating point with fewer than 32 bits (bfloat16, float16, float8)."""
    return t.is_floating_point() and t.element_size() < 4


def computation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a probe computes ``model`` in: its floating dtype, at least float32.

    The first floating parameter decides (``float64`` under ``"64-true"``, ``float32`` for
    float32, bfloat16 and float16 weights); ``float32`` for a model without floating parameters.

    Example:
        >>> computation_dtype(nn.Linear(2, 2).bfloat16())
        torch.float32
    """
    for p in model.parameters():
        if p.is_floating_point():
            return torch.promote_types(p.dtype, torch.float32)
    return torch.float32


def cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor of ``inputs`` (a tensor, or a dict/tuple/list of them) in ``dtype``.

    Integer tensors (token ids, masks) and other leaves are returned as they are; a tensor
    already in ``dtype`` is not copied.

    Example:
        >>> cast_inputs({"x": torch.ones(1, dtype=torch.bfloat16), "ids": torch.ones(1).long()},
        ...             torch.float32)
        {'x': tensor([1.]), 'ids': tensor([1])}
    """
    return map_tensors(inputs, lambda t: t.to(dtype) if t.is_floating_point() else t)


@contextmanager
def widened(model: nn.Module) -> Iterator[None]:
    """Scope in which every bfloat16/float16 parameter and buffer of ``model`` is float32.

    Each narrow parameter is re-bound, in every module that holds it, to one float32 copy
    (a new ``Parameter``: tied weights stay tied), and each narrow buffer to a float32 copy. The
    original ``Parameter`` objects are not touched at all: swapping their ``.data`` to another
    dtype would reset their gradient accumulators, and with them the hooks DDP (and FSDP,
    optimizers in backward) registered there, so gradients would no longer be all-reduced. On
    exit the originals are bound again: the model is exactly as before, whatever happened
    inside. Tensors that are not plain (e.g. FSDP2's ``DTensor`` shards) are left as they are.
    Within the scope :func:`trained_parameters` gives the original tensors.

    Args:
        model: The observed network.

    Yields:
        Nothing.

    Example:
        >>> net = nn.Linear(2, 2).bfloat16()
        >>> with widened(net):
        ...     net.weight.dtype
        torch.float32
        >>> net.weight.dtype
        torch.bfloat16
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    rebound: list[tuple[nn.Module, str, Tensor]] = []
    wide: dict[int, nn.Parameter] = {}  # one copy per parameter: tied weights stay tied
    copies: dict[int, Tensor] = {}  # one copy per buffer
    try:
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and is_narrow(p) and type(p.data) is Tensor:
                    if id(p) not in wide:
                        copy = nn.Parameter(p.detach().float(), requires_grad=p.requires_grad)
                        wide[id(p)] = copy
                        _TRAINED[id(copy)] = p.detach()
                    swapped.append((m, name, p))
                    m._parameters[name] = wide[id(p)]
            for name, b in list(m._buffers.items()):
                if b is not None and is_narrow(b) and type(b.data) is Tensor:
                    if id(b) not in copies:
                        copies[id(b)] = b.float()
                    rebound.append((m, name, b))
                    m._buffers[name] = copies[id(b)]
        yield
    finally:
        for m, name, b in reversed(rebound):
            m._buffers[name] = b
        for m, name, p in reversed(swapped):
            m._parameters[name] = p
        for copy in wide.values():
            _TRAINED.pop(id(copy), None)


def trained_parameters(model: nn.Module) -> dict[str, Tensor]:
    """``{name: detached parameter}`` in the dtype it trains in, also inside :func:`widened`.

    For what a probe keeps beyond its run (a copy of the weights for the next step, a
    checkpoint of them): inside :func:`widened` a parameter is a float32 copy, and keeping
    that would double the memory of bfloat16 weights; these are the original tensors
    (read-only: never write into them).

    Example:
        >>> net = nn.Linear(2, 2).bfloat16()
        >>> with widened(net):
        ...     trained_parameters(net)["weight"].dtype
        torch.bfloat16
    """
    return {k: _TRAINED.get(id(p), p.detach()) for k, p in model.named_parameters()}


def check_output_precision(
    model: nn.Module,
    data: ProbeSet,
    probe: str,
    output_fn: OutputFn | None = None,
    precision: str | None = None,
) -> None:
    """Refuse a model whose forward computes in reduced precision itself (at fit start).

    Call inside :func:`widened` (:func:`~lightning_probes.core.isolation.isolated`): weights
    and inputs are then float32 or wider, so narrower logits on two probe samples mean that
    ``forward`` casts down or opens an autocast region of its own, and every value the probe
    computes would carry that rounding. A forward that fails is left to the probe's own
    checks.

    Args:
        model: The observed network (widened).
        data: The probe set, inputs in :func:`computation_dtype`.
        probe: The probe's name, for the message.
        output_fn: Maps the model output to logits.
        precision: The Trainer's ``precision``, for the message.

    Raises:
        ValueError: Naming the probe, the precision and what to change.
    """
    two = slice_rows(data.inputs, 0, min(2, len(data)))
    try:
        with torch.no_grad():
            logits = as_logits(call_model(model, None, two), output_fn)
    except Exception:  # reported by the probe's own checks, with their hints
        return
    if is_narrow(logits):
        raise ValueError(
            f"{probe}: under precision={precision!r} the model returns {logits.dtype} logits "
            "although the probe runs it with float32 weights and inputs: its `forward` casts "
            "down or opens an autocast region itself, so every value the probe computes would "
            f"carry {logits.dtype} rounding. Leave precision to the Trainer (`precision=` "
            '"bf16-true", "bf16-mixed", ...; the probes then compute in float32) and remove the '
            "cast or autocast from `forward`."
        )
