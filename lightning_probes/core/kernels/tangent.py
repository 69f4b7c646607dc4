r"""Exact per-layer tangent kernels :math:`K_l = J_l J_l^T` of a network's logits.

For a probe set of ``n`` samples and a model with ``o`` logits, layer ``l``'s tangent kernel is
the ``(n·o, n·o)`` matrix with row index ``i·o + c``

.. math:: K_l[(i, c), (j, d)] = \nabla_{\theta_l} f_c(x_i) \cdot \nabla_{\theta_l} f_d(x_j),

the NTK of the network when only layer ``l``'s own parameters move (Lou et al., ICML 2022,
Sec. 2; Baratin et al. 2021). A "layer" is one module with the parameters it owns directly,
or those its registry entry gives it: ``nn.MultiheadAttention`` is one layer with all its
parameters (``out_proj``'s included) and its attention output ``output[0]``.

First, every selected layer is checked (:mod:`lightning_probes.core.kernels.layout`): it runs
once per forward, shares no parameter with another module (tied weights are refused), and its
samples sit on one axis of its output, found by permuting samples; a layer whose registry entry
computes each position alone (Linear, LayerNorm, Embedding) may hold them on another axis
(sequence-first ``[T, n, d]``), which is moved to 0. The probe inputs may be a tensor, a tuple
or a mapping of tensors (``model(**inputs)``, e.g. with an ``attention_mask``).

How it is computed, without materialising per-sample gradients where avoidable:

- Layers whose registry entry (:mod:`lightning_probes.core.modules`) gives kernel factors —
  ``nn.Linear`` and HF ``Conv1D`` (inputs of any leading shape; positions are summed over),
  ``nn.Conv1d/2d`` (any stride, padding, dilation, groups, padding mode), or a user's
  registered type: the
  forward/backward decomposition
  :math:`K = (A A^T + 1) \circ (\Delta \Delta^T)` of eq. (9), summed over position pairs, or
  per-sample gradients, whichever a flop count says is cheaper
  (:mod:`lightning_probes.core.kernels.factors`).
- Any other module with parameters (LayerNorm, BatchNorm in eval, Embedding,
  ``nn.MultiheadAttention``, custom): per-sample vector-Jacobian products with :mod:`torch.func`
  (:mod:`lightning_probes.core.kernels.func`).

The gradients of all ``o`` outputs w.r.t. every selected layer's output come from one forward
and one batched backward (:mod:`lightning_probes.core.kernels.capture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn, chunks
from lightning_probes.core.kernels.capture import (
    MAX_KERNEL_BYTES,
    Classes,
    LayerRecord,
    check_batchnorm_eval,
    check_kernel_memory,
    record_layers,
    select_classes,
)
from lightning_probes.core.kernels.factors import AffineFactors, LayerFactors, full_kernel
from lightning_probes.core.kernels.func import func_factors
from lightning_probes.core.kernels.layout import (
    check_untied,
    default_kernel_layers,
    layer_input,
    sample_axes,
    to_sample_first,
)
from lightning_probes.core.layers import LayerSelection, owns_parameters, select_layers
from lightning_probes.core.modules import ops_for
from lightning_probes.functional.linalg import self_gram

KernelMethod = Literal["auto", "gram", "jacobian", "func"]
_METHODS = ("auto", "gram", "jacobian", "func")
Layers = LayerSelection  # the kernels' name for a layer selection (re-exported)


def resolve_layers(model: nn.Module, layers: Layers, *, inputs: Any = None) -> dict[str, nn.Module]:
    """``{name: module}`` from names/globs, a ready mapping, or ``None`` (the default layers).

    The default layers are the registry's weight layers (Linear, Conv, HF ``Conv1D``,
    ``nn.MultiheadAttention``) with parameters of their own that no other module shares, not
    counting modules whose parameters belong to such a layer (``out_proj``, which the attention
    uses without calling it); with ``inputs``, only those that run on the first two samples.

    Args:
        model: The network.
        layers: The selection (see :func:`layer_tangent_kernels`).
        inputs: Probe inputs, to keep only default layers that run (optional).

    Raises:
        ValueError: If a selected module owns no parameters, shares one with another module
            (tied weights, naming both), or a name matches nothing.
    """
    if layers is None:
        return default_kernel_layers(model, inputs)
    selected = dict(layers) if isinstance(layers, Mapping) else select_layers(model, layers)
    empty = [name for name, m in selected.items() if not owns_parameters(m)]
    if empty:
        raise ValueError(
            f"Expected layers that own parameters, got {', '.join(map(repr, empty))} without "
            "any (a container's parameters belong to its children: name the children)."
        )
    check_untied(model, selected)
    return selected


def tangent_kernel_factors(
    model: nn.Module,
    inputs: Any,
    *,
    layers: Layers = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    method: KernelMethod = "auto",
    classes: Classes = None,
) -> dict[str, LayerFactors]:
    """Per-layer factors from which kernel blocks are computed (see :func:`layer_tangent_kernels`).

    The forward/backward runs on ``chunk_size`` samples at a time; the factors (layer inputs and
    output gradients, ``O(n·(d_in + o·d_out))`` per layer) are kept for all samples. Each
    layer's sample axis is found first (:mod:`lightning_probes.core.kernels.layout`) and moved
    to axis 0, or the layer is refused.
    """
    if method not in _METHODS:
        raise ValueError(f"`method` can be {', '.join(_METHODS)}, got {method!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be a positive int or None, got {chunk_size!r}.")
    output_fn = select_classes(output_fn, classes)
    check_batchnorm_eval(model)
    selected = resolve_layers(model, layers, inputs=inputs)
    axes = sample_axes(model, inputs, selected)
    data = ProbeSet(inputs, None)
    parts: list[dict[str, LayerRecord]] = []
    for chunk_inputs, _, size in chunks(data, chunk_size):
        records, _ = record_layers(model, chunk_inputs, selected, output_fn, total=len(data))
        parts.append(
            {k: to_sample_first(selected[k], r, axes[k], k, size) for k, r in records.items()}
        )
    merged = {name: _merge([p[name] for p in parts]) for name in selected}
    return {
        name: _factors(module, merged[name], method, chunk_size)
        for name, module in selected.items()
    }


def layer_tangent_kernels(
    model: nn.Module,
    inputs: Any,
    *,
    layers: Layers = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    method: KernelMethod = "auto",
    classes: Classes = None,
    max_kernel_bytes: int | None = MAX_KERNEL_BYTES,
) -> dict[str, Tensor]:
    r"""Exact tangent kernel of each layer, :math:`K_l = J_l J_l^T`, shape ``(n·o, n·o)``.

    .. math:: K_l[i o + c,\; j o + d] = \nabla_{\theta_l} f_c(x_i) \cdot \nabla_{\theta_l} f_d(x_j)

    Args:
        model: The network, BatchNorm in eval mode (``model.eval()``); not modified.
        inputs: The probe set: a ``[n, ...]`` tensor (``model(x)``), a tuple of them
            (``model(*args)``) or a mapping (``model(**kwargs)``, e.g. ``input_ids`` with
            ``attention_mask``), all sharing the sample axis 0.
        layers: Names or ``fnmatch`` globs from ``model.named_modules()``, a ``{name: module}``
            mapping, or ``None`` for every Linear/Conv/HF ``Conv1D``/``MultiheadAttention``
            layer that runs in the forward and shares no parameter (see
            :func:`resolve_layers`).
        output_fn: Maps the model output to logits ``[n, o]`` (e.g. a language model's last
            position, ``lambda out: out[:, -1]``).
        chunk_size: Samples per forward/backward and per kernel block (``None``: all at once).
        method: ``"auto"`` (cost model per layer), ``"gram"``/``"jacobian"`` (force a path for
            Linear/Conv layers), ``"func"`` (the :mod:`torch.func` path for every layer).
        classes: Output columns to keep (after ``output_fn``): the kernel over a subset of
            classes, ``o = len(classes)``.
        max_kernel_bytes: Refuse, before assembling them, kernels larger than this (``None``:
            no limit); the message states the memory ``(n·o)^2`` elements need.

    Returns:
        ``{name: kernel}`` in the logits' dtype (the model's dtype), ordered as the layers.

    Raises:
        ValueError: If a layer runs more or less than once per forward (weight sharing), shares
            a parameter (tied weights), has no sample axis it can move first (a sequence-first
            layer of an unknown type), a BatchNorm is in train mode, the logits are not
            ``[n, o]`` (the message gives an ``output_fn`` and the kernel's memory), a kernel
            exceeds ``max_kernel_bytes``, or a layer owns no parameters.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> kernels = layer_tangent_kernels(net, torch.randn(5, 3))
        >>> {name: tuple(k.shape) for name, k in kernels.items()}
        {'0': (10, 10), '2': (10, 10)}
    """
    factors = tangent_kernel_factors(
        model, inputs, layers=layers, output_fn=output_fn, chunk_size=chunk_size, method=method,
        classes=classes,
    )  # fmt: skip
    for f in factors.values():
        check_kernel_memory(f.num_samples, f.num_outputs, f.dtype, max_kernel_bytes)
        break
    return {name: full_kernel(f, chunk_size) for name, f in factors.items()}


def forward_backward_kernels(
    model: nn.Module,
    inputs: Any,
    *,
    layers: Layers = None,
    output_fn: OutputFn | None = None,
    normalize: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    r"""Forward and backward kernels of each Linear layer (Lou et al. 2022, eq. (9)).

    .. math::
        \overrightarrow{K}[i, j] = a_i \cdot a_j + 1_{\text{bias}}, \qquad
        \overleftarrow{K}[(i,c),(j,d)] = \delta^c_i \cdot \delta^d_j, \qquad
        K_l = (\overrightarrow{K} \otimes 11^T) \circ \overleftarrow{K},

    with :math:`a_i` the layer input and :math:`\delta^c_i = \partial f_c(x_i)/\partial z_l`.
    ``normalize=True`` gives the paper's averaged kernels (forward divided by ``in_features``,
    backward by ``out_features``).

    Args:
        model: The network (BatchNorm in eval mode).
        inputs: ``[n, ...]`` probe inputs.
        layers: As in :func:`layer_tangent_kernels`; every selected layer must be ``nn.Linear``
            applied to ``[n, in_features]`` inputs.
        output_fn: Maps the model output to logits ``[n, o]``.
        normalize: Divide by the layer widths as in the paper.

    Returns:
        ``{name: (forward [n, n], backward [n·o, n·o])}``.

    Raises:
        ValueError: For non-Linear layers or inputs with extra (sequence) dimensions.
    """
    selected = resolve_layers(model, layers, inputs=inputs)
    bad = [k for k, m in selected.items() if not _flat_kernel(m)]
    if bad:
        raise ValueError(f"Expected nn.Linear layers for eq. (9), got {', '.join(bad)}.")
    axes = sample_axes(model, inputs, selected)
    records, _ = record_layers(model, inputs, selected, output_fn)
    n = len(ProbeSet(inputs, None))
    records = {k: to_sample_first(selected[k], r, axes[k], k, n) for k, r in records.items()}
    out = {}
    for name, module in selected.items():
        a, grads = layer_input(records[name]), records[name].grads
        if a.ndim != 2:
            raise ValueError(
                f"Expected layer {name!r} to receive [n, in_features] inputs for eq. (9), got "
                f"{tuple(a.shape)}; with positions the kernel is not a single Hadamard product."
            )
        o, n = grads.shape[:2]
        forward = a @ a.T + (1.0 if module.bias is not None else 0.0)
        d = grads.transpose(0, 1).reshape(n * o, -1)
        backward = self_gram(d)
        if normalize:
            forward = forward / a.shape[1]
            backward = backward / grads.shape[-1]
        out[name] = (forward, backward)
    return out


def _flat_kernel(module: nn.Module) -> bool:
    ops = ops_for(module)
    return ops is not None and ops.flat_kernel(module)


def _factors(
    module: nn.Module, record: LayerRecord, method: KernelMethod, chunk_size: int | None
) -> LayerFactors:
    grads = record.grads
    ops = ops_for(module)
    if method != "func" and ops is not None:
        x = layer_input(record).to(grads.dtype)
        factors = ops.kernel_factors(module, x, grads)
        if factors is not None:
            return AffineFactors(*factors, module.bias is not None, method)
    return func_factors(module, record, chunk_size)


def _merge(records: list[LayerRecord]) -> LayerRecord:
    if len(records) == 1:
        return records[0]
    first = records[0]
    n0 = first.grads.shape[1]
    args = tuple(
        torch.cat([r.args[k] for r in records])
        if isinstance(a, Tensor) and a.ndim and a.shape[0] == n0
        else a
        for k, a in enumerate(first.args)
    )
    kwargs = {
        key: torch.cat([r.kwargs[key] for r in records])
        if isinstance(v, Tensor) and v.ndim and v.shape[0] == n0
        else v
        for key, v in first.kwargs.items()
    }
    return LayerRecord(args, kwargs, torch.cat([r.grads for r in records], 1))
