r"""Which layers a kernel can be computed for, and where each keeps its samples.

A kernel row is ``(sample, output)``, so every selected layer must

- run exactly once per forward (a module called twice shares its weights between two places;
  ``nn.MultiheadAttention.out_proj`` never runs as a module at all: the attention block is
  the layer, with all its parameters, see :mod:`lightning_probes.core.modules.attention`),
- own parameters that no other module uses (tied weights, e.g. GPT-2's ``lm_head`` and
  ``wte``: the kernel w.r.t. a shared parameter would have to sum over all its uses) and no
  other selected layer counts as its own (``out_proj`` selected with its attention block),
- hold its samples on one axis of its output, found by permuting samples
  (:func:`~lightning_probes.core.axes.find_sample_axes`, exact also when ``T == n``): axis 0,
  or another axis that its registry entry lets move to 0
  (:meth:`~lightning_probes.core.modules.LayerOps.moves_samples`: ``linear1`` of a
  sequence-first ``nn.TransformerEncoderLayer`` sees ``[T, n, d]``).

What fails is refused before any kernel is computed, with a message naming the layer. The
default selection (``layers=None``) keeps the weight layers of the registry
(:attr:`~lightning_probes.core.modules.LayerOps.default_layer`: Linear, Conv, HF ``Conv1D``,
``nn.MultiheadAttention``) that pass these checks on the first samples; a module whose
parameters belong to a selected layer (``out_proj`` inside its attention) is not a layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.axes import find_sample_axes
from lightning_probes.core.data import ProbeSet, map_tensors, model_arguments, tensors_of
from lightning_probes.core.kernels.capture import LayerRecord, check_batchnorm_eval
from lightning_probes.core.layers import owns_parameters
from lightning_probes.core.modules import layer_output, layer_parameters, ops_for

NOT_A_MODULE_CALL = (
    " A module whose parent uses its parameters directly (nn.MultiheadAttention.out_proj) "
    "never runs as a module: select the parent (the attention block is one layer)."
)


def tied_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [qualified names]}`` of parameters owned by more than one module."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    return {k: sorted(set(v)) for k, v in owners.items() if len(set(v)) > 1}


def check_untied(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Refuse layers sharing a parameter with another module or another selected layer.

    Tied weights (a parameter two modules own), or a parameter another selected layer counts
    as its own (``out_proj`` selected with its attention block).

    Raises:
        ValueError: Naming the layer and the other module(s) sharing its parameter.
    """
    claimed: dict[int, str] = {}
    for name, module in layers.items():
        for p in layer_parameters(module).values():
            other = claimed.setdefault(id(p), name)
            if other != name:
                first, second = sorted(  # the block first, the part of it second
                    (other, name), key=lambda k: -len(layer_parameters(layers[k]))
                )
                raise ValueError(
                    f"Expected layers with parameters of their own, got {second!r}, whose "
                    f"parameters are part of layer {first!r} ({type(layers[first]).__name__} "
                    f"computes with them: it is one layer). Select only {first!r}."
                )
    tied = tied_parameters(model)
    for name, module in layers.items():
        for pname, p in layer_parameters(module).items():
            if id(p) in tied:
                others = [t for t in tied[id(p)] if t != f"{name}.{pname}"]
                raise ValueError(
                    f"Expected layers whose parameters no other module uses, got {name!r}, whose "
                    f"{pname!r} is the same parameter as {', '.join(map(repr, others))} (tied "
                    "weights). Its tangent kernel would sum over every use of that parameter, "
                    "which a per-layer kernel does not compute. Exclude it from `layers=` (the "
                    "default selection leaves tied layers out)."
                )


def default_kernel_layers(model: nn.Module, inputs: Any = None) -> dict[str, nn.Module]:
    """The registry's weight layers with parameters of their own, untied, that run.

    Args:
        model: The network.
        inputs: Probe inputs; with them, layers never called on the first samples are left
            out (a layer called twice stays, to be refused by name). ``None``: no call check.

    Raises:
        ValueError: If no layer is left, listing the model's modules.
    """
    tied = tied_parameters(model)
    named = [(k, m) for k, m in model.named_modules() if k]
    selected: dict[str, nn.Module] = {}
    claimed: set[int] = set()  # children's parameters that a parent layer computes with
    for name, m in named:  # parents first
        ops = ops_for(m)
        params = layer_parameters(m).values()
        if (
            ops is not None
            and ops.default_layer
            and owns_parameters(m)
            and not any(id(p) in tied or id(p) in claimed for p in params)
        ):
            selected[name] = m
        own = {id(p) for p in m.parameters(recurse=False)}
        claimed.update(id(p) for p in params if id(p) not in own)
    if inputs is not None and selected:
        outputs = layer_outputs(model, _first_rows(inputs, 2), selected)
        selected = {k: m for k, m in selected.items() if outputs[k]}
    if not selected:
        names = ", ".join(f"{k} ({type(m).__name__})" for k, m in named[:40])
        raise ValueError(
            f"No Linear/Conv layer of {type(model).__name__} runs in the forward with "
            f"parameters of its own, untied. Pass `layers=` with names from: {names}."
        )
    return selected


def layer_outputs(
    model: nn.Module, inputs: Any, layers: Mapping[str, nn.Module]
) -> dict[str, list[Any]]:
    """Each layer's outputs (one per call) in one forward without gradients on ``inputs``.

    Raises:
        ValueError: If a BatchNorm is in train mode (the forward would update its statistics).
    """
    check_batchnorm_eval(model)
    outs: dict[str, list[Any]] = {k: [] for k in layers}

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = layer_output(module, output)  # MultiheadAttention: the attention output
            outs[name].append(out.detach() if isinstance(out, Tensor) else out)

        return hook

    handles = [m.register_forward_hook(make_hook(k)) for k, m in layers.items()]
    try:
        with torch.no_grad():
            args, kwargs = model_arguments(inputs)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return outs


def sample_axes(model: nn.Module, inputs: Any, layers: Mapping[str, nn.Module]) -> dict[str, int]:
    """The sample axis of each layer's output, checked usable for its kernel.

    Args:
        model: The network (in the mode the kernels are computed in).
        inputs: Probe inputs (tensor, tuple or mapping of tensors sharing the batch axis).
        layers: ``{name: module}``.

    Returns:
        ``{name: axis}``, each 0 or an axis the layer's registry entry can move to 0.

    Raises:
        ValueError: For a layer not run exactly once, with no single sample axis, or with its
            samples on an axis it cannot move; each message names the layer and the axis.
        TypeError: For a layer whose output is not a tensor.
    """
    sub = _distinct_rows(inputs, 3)
    m = len(ProbeSet(sub, None))
    outputs = layer_outputs(model, sub, layers)
    for name, outs in outputs.items():
        if len(outs) != 1:
            raise ValueError(
                f"Expected layer {name!r} to run exactly once per forward, got {len(outs)} "
                "calls. A module called twice shares its weights between two places (or is "
                "unused), so its per-layer tangent kernel is ill-defined."
                + NOT_A_MODULE_CALL
                + " Exclude it with `layers=`."
            )
        if not isinstance(outs[0], Tensor):
            raise TypeError(
                f"Expected layer {name!r} to return a Tensor, got {type(outs[0]).__name__}. "
                "Select modules whose output is a tensor, or register the type "
                "(lightning_probes.core.modules.register) with an entry whose `output_index` "
                "says which element of its output the layer's output is."
            )
    if m == 1:
        found: dict[str, int | None] = {k: 0 if o[0].shape[:1] == (1,) else None
                                        for k, o in outputs.items()}  # fmt: skip
    else:
        found = find_sample_axes(model, sub, layers, num_samples=m)
    axes = {}
    for name, module in layers.items():
        shape = tuple(outputs[name][0].shape)
        axis = found[name]
        if axis is None:
            why = (
                "with one distinct probe sample it cannot be found"
                if m == 1
                else "its samples are mixed (e.g. BatchNorm in train mode, attention across "
                "the batch) or it does not depend on the sample"
            )
            raise ValueError(
                f"Expected layer {name!r} ({type(module).__name__}) to keep each sample on one "
                f"axis of its output, got an output of shape {shape} (for {m} samples) where no "
                f"single axis follows the samples: {why}. Exclude it from `layers=`."
            )
        ops = ops_for(module)
        if axis != 0 and (ops is None or not ops.moves_samples(module, axis, len(shape))):
            raise ValueError(
                f"Expected layer {name!r} ({type(module).__name__}) to hold the samples on axis "
                f"0 of its output, got them on axis {axis} of {shape} (for {m} samples; e.g. a "
                "sequence-first layer). Its registry entry does not state that it computes each "
                "position alone, so its kernel cannot be read with the samples moved first. "
                "Exclude it from `layers=`, or register its type "
                "(lightning_probes.core.modules.register) with an entry whose `moves_samples` "
                "allows that axis."
            )
        axes[name] = axis
    return axes


def layer_input(record: LayerRecord) -> Tensor:
    """The tensor a single-input layer received (first positional tensor, else keyword)."""
    for a in (*record.args, *record.kwargs.values()):
        if isinstance(a, Tensor):
            return a
    raise TypeError("Expected a layer called with a tensor input, got none.")


def to_sample_first(
    module: nn.Module, record: LayerRecord, axis: int, name: str, num_samples: int
) -> LayerRecord:
    """``record`` with the sample ``axis`` of the layer's input and output moved to 0.

    The inputs take the form the layer's registry entry gives
    (:meth:`~lightning_probes.core.modules.LayerOps.sample_first_inputs`, e.g. the query, key,
    value and masks of ``nn.MultiheadAttention``); by default its one tensor input is moved.

    Args:
        module: The layer.
        record: What :func:`~lightning_probes.core.kernels.capture.record_layers` recorded.
        axis: The sample axis of the layer's output (from :func:`sample_axes`).
        name: The layer's name, for messages.
        num_samples: Samples of the forward that recorded it.

    Raises:
        ValueError: If that axis does not hold ``num_samples`` samples, or the layer takes
            more than one tensor, or its input disagrees.
    """
    shape = tuple(record.grads.shape[1:])
    if axis >= len(shape) or shape[axis] != num_samples:
        raise ValueError(
            f"Expected layer {name!r} to hold the {num_samples} samples on axis {axis} of its "
            f"output, got shape {shape}. Exclude it from `layers=`."
        )
    ops = ops_for(module)
    try:
        moved_inputs = (
            None
            if ops is None
            else ops.sample_first_inputs(module, record.args, record.kwargs, axis, num_samples)
        )
    except ValueError as err:
        raise ValueError(
            f"Layer {name!r} ({type(module).__name__}): {err} Exclude it from `layers=`."
        ) from err
    if moved_inputs is not None:
        return LayerRecord(*moved_inputs, record.grads.movedim(axis + 1, 1))
    if axis == 0:
        return record
    tensors = [a for a in (*record.args, *record.kwargs.values()) if isinstance(a, Tensor)]
    x = layer_input(record)
    if len(tensors) != 1 or x.ndim <= axis or x.shape[axis] != num_samples:
        raise ValueError(
            f"Expected layer {name!r}, with its samples on axis {axis}, to take one tensor "
            f"with the samples on that axis too, got {[tuple(t.shape) for t in tensors]}. "
            "Exclude it from `layers=`."
        )
    moved = x.movedim(axis, 0)
    args = tuple(moved if a is x else a for a in record.args)
    kwargs = {k: moved if v is x else v for k, v in record.kwargs.items()}
    return LayerRecord(args, kwargs, record.grads.movedim(axis + 1, 1))


def _first_rows(inputs: Any, m: int) -> Any:
    return _take(inputs, torch.arange(min(m, len(ProbeSet(inputs, None))), device="cpu"))


def _distinct_rows(inputs: Any, m: int) -> Any:
    """Up to ``m`` probe samples that differ from each other (the first ones that do)."""
    n = len(ProbeSet(inputs, None))
    tensors = tensors_of(inputs)
    kept: list[int] = []
    for i in range(n):
        if not any(all(torch.equal(t[i], t[j]) for t in tensors) for j in kept):
            kept.append(i)
            if len(kept) == m:
                break
    return _take(inputs, torch.tensor(kept, device="cpu"))


def _take(value: Any, idx: Tensor) -> Any:
    return map_tensors(value, lambda t: t[idx.to(t.device)])
