r"""The paper's default layers for ablation and selectivity, checked on a forward pass.

Morcos et al. (2018, sec. 2.2) ablate all hidden layers of MLPs and the last three conv layers
of conv nets. On other architectures "hidden layer" is read as: a linear-family layer (by the
registry: ``nn.Linear``, HF ``Conv1D``) whose units are post-nonlinearity, e.g. the first layer
of each transformer MLP (GPT-2's ``mlp.c_fc``, BERT's ``intermediate.dense``). Only modules
that actually run once per forward pass and hold the samples on axis 0 of their output are
chosen; modules inside ``nn.MultiheadAttention`` never are (it uses their weights
functionally: ``out_proj`` is never called as a module).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_probes.core.axes import find_sample_axes
from lightning_probes.core.interventions.inputs import num_samples
from lightning_probes.core.interventions.points import Call, follow_to_activation
from lightning_probes.core.modules import ConvOps, LinearOps, ops_for

_SHAPE_ONLY = ("View", "Reshape", "Unsafe", "Permute", "Transpose", "Clone", "Expand", "Alias")


def has_module_of_type(model: nn.Module, types: tuple[type[nn.Module], ...]) -> bool:
    """Whether any submodule of ``model`` (itself included) is an instance of ``types``."""
    return any(isinstance(m, types) for m in model.modules())


def candidate_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(conv layers, linear-family layers)`` by the registry, in definition order.

    Linear-family: entries that are :class:`~lightning_probes.core.modules.LinearOps`
    (``nn.Linear``, HF ``Conv1D``, a user's registered dense layer); conv:
    :class:`~lightning_probes.core.modules.ConvOps`. Modules inside an
    ``nn.MultiheadAttention`` are left out: it computes with their weights functionally
    (``out_proj`` is never called as a module).
    """
    inside_mha = {
        f"{name}.{sub}" if name else sub
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for sub, _ in m.named_modules()
        if sub
    }
    convs, linears = [], []
    for name, m in model.named_modules():
        if not name or name in inside_mha:
            continue
        ops = ops_for(m)
        if isinstance(ops, ConvOps):
            convs.append(name)
        elif isinstance(ops, LinearOps):
            linears.append(name)
    return convs, linears


def default_ablation_layers(model: nn.Module) -> list[str]:
    """The paper's default, from the model's structure alone (no forward pass).

    Conv nets: the last three conv layers; otherwise all linear-family layers but the last
    (hidden + output). :func:`trace_model` with ``layers=None`` refines this on a forward pass
    (modules that run, post-nonlinearity units, samples on axis 0: see
    :func:`choose_default_layers`).

    Raises:
        ValueError: If the model has neither conv layers nor at least two linear layers.
    """
    convs, linears = candidate_layers(model)
    if convs:
        return convs[-3:]
    if len(linears) < 2:
        raise ValueError(
            f"Expected {type(model).__name__} to have conv layers or at least two Linear layers "
            "(hidden + output) to choose default ablation layers, got none. Pass `layers=`."
        )
    return linears[:-1]


def choose_default_layers(
    model: nn.Module, inputs: Any, calls: list[Call], where: dict[str, list[int]]
) -> list[str]:
    """The paper's default layers, checked on the traced forward pass ``calls``.

    Among the registry's conv / linear-family layers (:func:`candidate_layers`) that ran
    exactly once and whose output has its samples on axis 0 (:func:`sample_axes`):

    - conv nets: the last three conv layers;
    - otherwise the hidden linear layers: those followed by an activation module
      (post-nonlinearity units: GPT-2's ``mlp.c_fc``, BERT's ``intermediate.dense``); if the
      activations are functional (``F.relu``, ``nn.TransformerEncoderLayer``'s default), those
      whose output reaches another linear-family layer through single-input ops only (the
      first layer of an MLP, read on the autograd graph; its point is then its pre-activation
      output, and with ReLU ablating it to 0 is ablating the post-activation); else every
      layer that ran but the last (the output layer).

    Raises:
        ValueError: If no layer qualifies (naming the layers left out and why).
    """
    convs, linears = candidate_layers(model)
    ran = {n for n in convs + linears if len(where.get(n, [])) == 1}
    ran = {n for n in ran if isinstance(calls[where[n][0]][3], Tensor)}
    named = dict(model.named_modules())
    axes = sample_axes(model, inputs, {n: named[n] for n in ran}) if ran else {}
    wrong = {n: a for n, a in axes.items() if a not in (None, 0)}
    usable = ran - set(wrong)

    def post_nonlinear(name: str) -> bool:
        j = follow_to_activation(calls, where[name][0], where)
        ops = ops_for(calls[j][1])
        return ops is not None and ops.activation

    present = [n for n in convs if n in usable]
    if present:
        return present[-3:]
    if not any(n in ran for n in convs):
        present = [n for n in linears if n in usable]
        hidden = [n for n in present if post_nonlinear(n)]
        if not hidden:
            fed = [calls[where[n][0]][2] for n in present]
            hidden = [n for n in present if feeds(calls[where[n][0]][3], fed)]
        chosen = hidden or present[:-1]
        if chosen:
            return chosen
    reasons = [
        f"{n!r} (sample axis {wrong[n]})"
        if n in wrong
        else f"{n!r} ({len(where.get(n, []))} calls)"
        for n in convs + linears
        if n not in usable
    ]
    raise ValueError(
        f"Expected {type(model).__name__} to have conv layers or at least two Linear layers "
        "(hidden + output) that run once per forward pass with the samples on axis 0 of their "
        f"output, to choose default ablation layers; left out: {', '.join(reasons) or 'none'}. "
        "Pass `layers=` naming layers applied to batch-first tensors."
    )


def feeds(output: Tensor, layer_inputs: list[Any], depth: int = 6) -> bool:
    """Whether ``output`` reaches one of ``layer_inputs`` through a nonlinearity.

    Walks the autograd graph back from each input through nodes with a single differentiable
    input (elementwise functions, dropout, views), at most ``depth`` of them, at least one of
    which is not a mere view/copy; ``False`` without a graph.
    """
    target = output.grad_fn
    if target is None:
        return False
    for x in layer_inputs:
        fn, changed = getattr(x, "grad_fn", None), False
        for _ in range(depth):
            if fn is None:
                break
            nxt = [f for f, _ in fn.next_functions if f is not None]
            if len(nxt) != 1:
                break
            changed = changed or not type(fn).__name__.startswith(_SHAPE_ONLY)
            fn = nxt[0]
            if fn is target:
                if changed:
                    return True
                break
    return False


def sample_axes(
    model: nn.Module, inputs: Any, layers: dict[str, nn.Module]
) -> dict[str, int | None]:
    """Each layer's sample axis (:func:`~lightning_probes.core.axes.find_sample_axes`).

    ``None`` (unknown) for every layer with fewer than 3 samples, or whose outputs cannot be
    compared (non-finite values).
    """
    if num_samples(inputs) < 3:
        return dict.fromkeys(layers)
    return find_sample_axes(model, inputs, layers)
