r"""One forward and one batched backward that collect every selected layer's kernel factors.

For each selected layer we record its inputs during a forward pass and obtain
:math:`\delta^c = \partial f_c / \partial z_l` for all ``o`` outputs ``c`` at once, with a single
``torch.autograd.grad(..., is_grads_batched=True)`` call (vmap over the backward), never a
Python loop over outputs. Samples are independent in eval mode, so the gradient of
:math:`\sum_i f_c(x_i)` w.r.t. the layer output of sample ``i`` is that sample's own
:math:`\delta^c_i`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn, as_logits


@dataclass
class LayerRecord:
    """What one forward/backward recorded for a layer.

    Attributes:
        args: Positional inputs of the layer's (single) call.
        kwargs: Keyword inputs of that call.
        grads: ``[o, n, *output_shape[1:]]``, gradient of each logit column summed over samples.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grads: Tensor


def check_batchnorm_eval(model: nn.Module) -> None:
    """Reject BatchNorm in train mode: its output for one sample depends on the whole batch.

    Raises:
        ValueError: Naming the offending modules and the fix (``model.eval()``).
    """
    bad = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if bad:
        raise ValueError(
            "Expected BatchNorm layers in eval mode: in train mode a sample's output depends on "
            "the other samples of the probe batch, so per-sample tangent kernels are ill-defined. "
            f"Got train mode in: {', '.join(bad)}. Call `model.eval()` first."
        )


@contextmanager
def _require_grad(params: list[nn.Parameter]) -> Iterator[None]:
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def record_layers(
    model: nn.Module,
    inputs: Any,
    layers: Mapping[str, nn.Module],
    output_fn: OutputFn | None = None,
) -> tuple[dict[str, LayerRecord], Tensor]:
    """Run ``model`` once on ``inputs`` and backpropagate all logit columns in one batched pass.

    Args:
        model: The network (BatchNorm in eval mode).
        inputs: A tensor ``[n, ...]`` or a tuple of positional inputs.
        layers: ``{name: module}`` to record.
        output_fn: Maps the model output to logits ``[n, o]``.

    Returns:
        ``({name: LayerRecord}, logits [n, o] detached)``.

    Raises:
        ValueError: If a layer runs more or less than once (weight sharing), or the logits are
            not ``[n, o]``.
        TypeError: If a layer returns something other than a tensor.
    """
    check_batchnorm_eval(model)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Tensor]]] = {k: [] for k in layers}

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"Expected layer {name!r} to return a Tensor, got {type(out).__name__}. "
                    "Select modules whose output is a tensor."
                )
            calls[name].append((_detach(a), _detach(kw), out))
            # later in-place ops (ReLU(inplace=True)) act on the clone, not on the recorded output
            return out.clone()

        return hook

    own = [p for m in layers.values() for p in m.parameters(recurse=False)]
    handles = [m.register_forward_hook(make_hook(k), with_kwargs=True) for k, m in layers.items()]
    try:
        with torch.enable_grad(), _require_grad(own):
            logits = as_logits(model(*args), output_fn)
            _check_calls(calls)
            n = _batch_size(args)
            if logits.ndim != 2 or logits.shape[0] != n:
                raise ValueError(
                    f"Expected the model to return logits of shape [n, o] = [{n}, o], got "
                    f"{tuple(logits.shape)}. Pass `output_fn=` to select or flatten them."
                )
            o = logits.shape[1]
            outs = [calls[k][0][2] for k in layers]
            basis = torch.eye(o, dtype=logits.dtype, device=logits.device)
            grad_outputs = basis[:, None, :].expand(o, n, o).contiguous()
            grads = torch.autograd.grad(
                logits, outs, grad_outputs=grad_outputs, is_grads_batched=True, allow_unused=True
            )
    finally:
        for h in handles:
            h.remove()
    records = {}
    for (name, (a, kw, out)), g in zip(((k, calls[k][0]) for k in layers), grads):
        if g is None:
            g = torch.zeros((o, *out.shape), dtype=out.dtype, device=out.device)
        records[name] = LayerRecord(a, kw, g.detach())
    return records, logits.detach()


def _check_calls(calls: Mapping[str, list[Any]]) -> None:
    for name, c in calls.items():
        if len(c) != 1:
            raise ValueError(
                f"Expected layer {name!r} to run exactly once per forward, got {len(c)} calls. "
                "A module called twice shares its weights between two places (or is unused), so "
                "its per-layer tangent kernel is ill-defined. Exclude it with `layers=`."
            )


def _batch_size(args: tuple[Any, ...]) -> int:
    for a in args:
        if isinstance(a, Tensor):
            return int(a.shape[0])
    raise TypeError("Expected at least one tensor among the model inputs, got none.")


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value
