"""Loss and gradient of a model on a fixed probe set, at arbitrary parameters.

Probes that evaluate the network away from its current weights (LCA along a training step,
landscape planes and segments) never write into the model: they call
:func:`torch.func.functional_call` with a ``{name: tensor}`` dict of parameters. The probe set
is processed in chunks so memory stays bounded however large it is ("full batch").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_probes.core.data import ProbeSet, model_arguments, slice_rows

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(outputs [n, ...], targets [n, ...]) -> mean loss over the n samples`` (a scalar)."""
OutputFn = Callable[[Any], Tensor]
"""``model output -> logits tensor [n, o]`` for models whose forward returns a dict/tuple."""


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy for integer class targets, mean squared error otherwise.

    Classes are on axis 1 (``[n, o]`` logits, or ``[n, C, ...]`` for dense prediction) or, for
    sequence models, on the last axis: logits ``[n, L, V]`` with token targets ``[n, L]`` give
    the token-level cross-entropy, averaged over every token (``-100`` targets ignored, as in
    ``torch`` and HF ``transformers``).

    Args:
        outputs: ``[n, o]``, ``[n, C, ...]`` or ``[n, L, V]`` logits.
        targets: ``[n]``, ``[n, ...]`` or ``[n, L]`` class indices (integer dtype), or a float
            tensor shaped like ``outputs``.

    Raises:
        ValueError: If both readings fit the shapes (e.g. ``[n, 12, 12]`` logits with ``[n, 12]``
            targets), naming ``loss_fn=`` to pass.
    """
    if not torch.is_floating_point(targets):
        if outputs.ndim == targets.ndim + 1 and outputs.ndim > 2:
            classes_last = outputs.shape[:-1] == targets.shape
            classes_second = outputs.shape[:1] + outputs.shape[2:] == targets.shape
            if classes_last and classes_second:
                raise ValueError(
                    f"Expected `loss_fn=` for logits {tuple(outputs.shape)} and targets "
                    f"{tuple(targets.shape)}: the classes could be the last axis (a sequence "
                    "model, [n, L, V] with [n, L]) or axis 1 (dense prediction, [n, C, ...]). "
                    "Pass e.g. `loss_fn=lambda out, y: F.cross_entropy(out.flatten(0, -2), "
                    "y.flatten())` for the first."
                )
            if classes_last:
                return nn.functional.cross_entropy(outputs.flatten(0, -2), targets.flatten())
        return nn.functional.cross_entropy(outputs, targets)
    return nn.functional.mse_loss(outputs, targets.to(outputs.dtype))


def as_logits(output: Any, output_fn: OutputFn | None = None) -> Tensor:
    """Apply ``output_fn`` to a model output, or check that it already is a tensor."""
    if output_fn is not None:
        output = output_fn(output)
    if not isinstance(output, Tensor):
        raise TypeError(
            f"Expected the model to return a Tensor of logits, got {type(output).__name__}. "
            "Pass `output_fn=` (e.g. `lambda out: out['logits']`) to the probe."
        )
    return output


class OutputAdapter(nn.Module):
    """``module`` whose output is passed through ``output_fn`` (dict/tuple outputs -> logits).

    For code that needs a plain ``tensor -> tensor`` network, e.g. the random networks of
    :func:`~lightning_probes.core.nad.neural_anisotropy_directions`.
    """

    def __init__(self, module: nn.Module, output_fn: OutputFn) -> None:
        super().__init__()
        self.module = module
        self.output_fn = output_fn

    def forward(self, *args: Any) -> Tensor:
        """``as_logits(module(*args), output_fn)``."""
        return as_logits(self.module(*args), self.output_fn)


def chunks(data: ProbeSet, chunk_size: int | None) -> list[tuple[Any, Tensor | None, int]]:
    """Split a probe set into ``(inputs, targets, n_chunk)`` pieces of at most ``chunk_size``."""
    n = len(data)
    size = n if chunk_size is None else max(1, int(chunk_size))
    out = []
    for start in range(0, n, size):
        stop = min(n, start + size)
        inputs = slice_rows(data.inputs, start, stop)
        targets = None if data.targets is None else data.targets[start:stop]
        out.append((inputs, targets, stop - start))
    return out


def probe_loss(
    model: nn.Module,
    data: ProbeSet,
    params: Mapping[str, Tensor] | None = None,
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Mean loss of ``model`` on the whole probe set, at ``params`` (default: its own weights).

    .. math:: L(\theta) = \frac{1}{n} \sum_{\text{chunks } B} |B| \, \ell_B(\theta)

    where :math:`\ell_B` is ``loss_fn``'s mean over chunk :math:`B` (equal to the full-batch
    mean for any chunking). Differentiable w.r.t. ``params`` when called under grad mode.

    Args:
        model: The network; its weights are not modified.
        data: The probe set (inputs ``[n, ...]``, targets ``[n, ...]``).
        params: ``{name: tensor}`` for some or all of ``model.named_parameters()``; the rest
            (and all buffers) are the model's own.
        loss_fn: ``(outputs, targets) -> mean loss``; default :func:`default_loss`.
        output_fn: Maps the model output to logits (for dict/tuple outputs).
        chunk_size: Samples per forward pass (``None``: all at once).

    Returns:
        A scalar tensor.
    """
    if data.targets is None:
        raise ValueError("Expected a probe set with targets to evaluate a loss, got none.")
    loss_fn = loss_fn or default_loss
    n = len(data)
    total: Tensor | None = None
    for inputs, targets, size in chunks(data, chunk_size):
        out = as_logits(call_model(model, params, inputs), output_fn)
        part = loss_fn(out, targets) * (size / n)  # type: ignore[arg-type]
        total = part if total is None else total + part
    assert total is not None
    return total


def probe_loss_and_grad(
    model: nn.Module,
    data: ProbeSet,
    params: Mapping[str, Tensor],
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    out: Mapping[str, Tensor] | None = None,
    weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Full-probe-set loss and its gradient w.r.t. ``params``, one chunk's graph at a time.

    Memory is that of one chunk's forward/backward plus one gradient copy, however large the
    probe set; with ``out``, no gradient copy at all. Gradients are accumulated in the dtype
    of ``params``.

    Args:
        model: The network (evaluated with ``functional_call`` at ``params``).
        data: The probe set (with targets).
        params: ``{name: tensor}`` at which to evaluate.
        loss_fn: ``(logits, targets) -> mean loss`` (default: cross-entropy or MSE).
        output_fn: Maps the model output to logits.
        chunk_size: Samples per forward/backward.
        out: If given, ``out[k] += weight * dL/dparams[k]`` in place: each buffer whose dtype,
            device and shape match is the private leaf's ``.grad``, so autograd adds every
            chunk's gradient straight into it; these buffers are returned as the gradients.
        weight: Scale of the gradient (of ``weight * L``; the returned loss is ``L``). A
            power of two scales exactly.

    Returns:
        ``(loss, {name: dL/dparam})``, detached.
    """
    if data.targets is None:
        raise ValueError("Expected a probe set with targets to evaluate a loss, got none.")
    loss_fn = loss_fn or default_loss
    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    seeded = seed_grads(leaves, out) if out is not None else set()
    n = len(data)
    total = torch.zeros((), dtype=next(iter(leaves.values())).dtype, device=_device(leaves))
    with torch.enable_grad():
        for inputs, targets, size in chunks(data, chunk_size):
            logits = as_logits(call_model(model, leaves, inputs), output_fn)
            part = loss_fn(logits, targets) * (size / n)  # type: ignore[arg-type]
            if part.requires_grad:
                # Accumulate straight into the private leaves' .grad (never the model's):
                # no separate accumulator, so one gradient copy instead of two.
                (part if weight == 1.0 else part * weight).backward(
                    inputs=[leaves[k] for k in names]
                )
            total += part.detach().to(total.dtype)
    if out is not None:
        collect_grads(leaves, out, seeded)
        return total, dict(out)
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return total, grads


def seed_grads(leaves: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> set[str]:
    """Make ``out[k]`` the ``.grad`` of ``leaves[k]`` where autograd can accumulate into it."""
    seeded = set()
    for k, leaf in leaves.items():
        buf = out[k]
        if buf.dtype == leaf.dtype and buf.device == leaf.device and buf.shape == leaf.shape:
            leaf.grad = buf
            seeded.add(k)
    return seeded


def collect_grads(
    leaves: Mapping[str, Tensor], out: Mapping[str, Tensor], seeded: set[str]
) -> None:
    """Bring ``.grad`` of ``leaves`` into ``out`` where autograd did not accumulate in place."""
    for k, leaf in leaves.items():
        g, leaf.grad = leaf.grad, None
        if g is None or g is out[k]:
            continue
        if k in seeded:  # autograd replaced the seeded buffer by ``buffer + gradient``
            out[k].copy_(g)
        else:
            out[k].add_(g)


def call_model(model: nn.Module, params: Mapping[str, Tensor] | None, inputs: Any) -> Any:
    """``model(inputs)`` at ``params`` (via ``functional_call``; ``None``: its own weights).

    A tuple ``inputs`` is passed as positional arguments, a mapping as keyword arguments
    (:func:`~lightning_probes.core.data.model_arguments`).
    """
    args, kwargs = model_arguments(inputs)
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(params), args, kwargs, strict=False)


def _device(params: Mapping[str, Tensor]) -> torch.device:
    return next(iter(params.values())).device
