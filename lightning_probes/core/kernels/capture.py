r"""One forward and one batched backward that collect every selected layer's kernel factors.

For each selected layer we record its inputs during a forward pass and obtain
:math:`\delta^c = \partial f_c / \partial z_l` for all ``o`` outputs ``c`` at once, with a single
``torch.autograd.grad(..., is_grads_batched=True)`` call (vmap over the backward), never a
Python loop over outputs. Samples are independent in eval mode, so the gradient of
:math:`\sum_i f_c(x_i)` w.r.t. the layer output of sample ``i`` is that sample's own
:math:`\delta^c_i`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet, model_arguments
from lightning_probes.core.evaluation import OutputFn, as_logits
from lightning_probes.core.modules import layer_output, layer_parameters, with_layer_output

Classes = Sequence[int] | Tensor | None
"""Output columns (classes) a kernel is restricted to; ``None``: all."""

MAX_KERNEL_BYTES = 16 * 2**30
"""Default limit of one assembled ``(n·o, n·o)`` kernel (16 GiB)."""


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


def select_classes(output_fn: OutputFn | None, classes: Classes) -> OutputFn | None:
    """``output_fn`` followed by keeping the logit columns ``classes`` (``None``: unchanged).

    Raises:
        ValueError: If ``classes`` is empty or has repeated entries.
    """
    if classes is None:
        return output_fn
    idx = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if idx.numel() == 0 or idx.unique().numel() != idx.numel():
        raise ValueError(f"Expected `classes` to list distinct output columns, got {classes!r}.")

    def select(out: Any) -> Tensor:
        logits = as_logits(out, output_fn)
        return logits.index_select(-1, idx.to(logits.device))

    return select


def human_bytes(size: float) -> str:
    """``size`` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.3g} {unit}"
        size /= 1024
    return f"{size:.3g} TiB"


def check_kernel_memory(n: int, o: int, dtype: torch.dtype, limit: int | None) -> None:
    """Refuse an ``(n·o, n·o)`` kernel of ``dtype`` larger than ``limit`` bytes.

    Raises:
        ValueError: Stating the memory and how to reduce it.
    """
    size = float(n * o) ** 2 * torch.empty((), dtype=dtype).element_size()
    if limit is not None and size > limit:
        raise ValueError(
            f"Expected a kernel of at most `max_kernel_bytes` = {human_bytes(limit)}, got "
            f"(n·o)^2 = ({n}·{o})^2 {dtype} elements = {human_bytes(size)} per layer. Keep "
            "fewer outputs (`classes=[...]` or `output_fn=`), fewer samples, or stream the "
            "statistics (kernel_statistics with `chunk_size=`); `max_kernel_bytes=None` lifts "
            "the limit."
        )


def record_layers(
    model: nn.Module,
    inputs: Any,
    layers: Mapping[str, nn.Module],
    output_fn: OutputFn | None = None,
    *,
    total: int | None = None,
) -> tuple[dict[str, LayerRecord], Tensor]:
    """Run ``model`` once on ``inputs`` and backpropagate all logit columns in one batched pass.

    Args:
        model: The network (BatchNorm in eval mode).
        inputs: A tensor ``[n, ...]`` (``model(x)``), a tuple (``model(*args)``) or a mapping
            (``model(**kwargs)``) of tensors sharing the sample axis.
        layers: ``{name: module}`` to record.
        output_fn: Maps the model output to logits ``[n, o]``.
        total: Samples of the whole probe set (for the kernel's memory in messages).

    Returns:
        ``({name: LayerRecord}, logits [n, o] detached)``.

    Raises:
        ValueError: If a layer runs more or less than once (weight sharing), or the logits are
            not ``[n, o]``.
        TypeError: If a layer returns something other than a tensor.
    """
    check_batchnorm_eval(model)
    args, kwargs = model_arguments(inputs)
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], Tensor]]] = {k: [] for k in layers}

    def make_hook(name: str) -> Callable[..., Tensor]:
        def hook(module: nn.Module, a: tuple[Any, ...], kw: dict[str, Any], output: Any) -> Any:
            out = layer_output(module, output)  # MultiheadAttention: the attention output [0]
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"Expected layer {name!r} to return a Tensor, got {type(out).__name__}. "
                    "Select modules whose output is a tensor."
                )
            calls[name].append((_detach(a), _detach(kw), out))
            # later in-place ops (ReLU(inplace=True)) act on the clone, not on the recorded output
            return with_layer_output(module, output, out.clone())

        return hook

    own = [p for m in layers.values() for p in layer_parameters(m).values()]
    handles = [m.register_forward_hook(make_hook(k), with_kwargs=True) for k, m in layers.items()]
    try:
        with torch.enable_grad(), _require_grad(own):
            logits = as_logits(model(*args, **kwargs), output_fn)
            _check_calls(calls)
            n = len(ProbeSet(inputs, None))
            if logits.ndim != 2 or logits.shape[0] != n:
                raise ValueError(_logits_message(tuple(logits.shape), n, total, logits.dtype))
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
                "its per-layer tangent kernel is ill-defined. A module whose parent uses its "
                "parameters directly (nn.MultiheadAttention.out_proj) never runs as a module. "
                "Exclude it with `layers=`."
            )


def _logits_message(shape: tuple[int, ...], n: int, total: int | None, dtype: torch.dtype) -> str:
    head = f"Expected the model to return logits of shape [n, o] = [{n}, o], got {shape}."
    if len(shape) < 3 or shape[0] != n:
        return f"{head} Pass `output_fn=` to select or flatten them."
    o = math.prod(shape[1:])
    samples = total or n
    size = float(samples * o) ** 2 * torch.empty((), dtype=dtype).element_size()
    return (
        f"{head} Per-position logits (a language model's [n, L, V]) give one output per "
        f"position and class: the full kernel over all o = {o} of them would be (n·o)^2 = "
        f"({samples}·{o})^2 {dtype} elements = {human_bytes(size)} per layer. Pass `output_fn=` "
        "to choose the outputs the kernel is over, e.g. the last position and a subset of "
        "classes: `output_fn=lambda out: out[:, -1, :16]`, or `output_fn=lambda out: "
        "out[:, -1]` with `classes=[...]`."
    )


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
