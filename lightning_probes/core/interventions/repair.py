"""Per-sample arguments of the modules after the first point, repeated for the expanded batch.

The engine (:mod:`lightning_probes.core.interventions.engine`) expands the first point's output
to ``m`` copies (batch ``m·n``, copy-major). A module called after that point may still receive
per-sample tensors computed before it, on ``n`` rows: BERT passes its attention mask to every
layer, and ``BertOutput`` adds the attention output back to the feed-forward branch. Repeating
exactly those arguments (as the batch is repeated) lets the rest of the network run once on the
expanded batch from the point itself, instead of from an enclosing block (which re-runs the
block's attention per mask).

Which arguments are per-sample is found structurally, not by their size at run time (a
sequence of 64 tokens must not be mistaken for 64 samples): the model runs once on 2 and once
on 3 samples, and an argument of a module call whose axis 0 has 2 and then 3 rows is
per-sample. The engine uses this only after checking, on two samples and two of the real
masks, that the expanded pass gives each mask's own logits (inline operations of a module
that was already running at the point, such as a ResNet block's ``out += identity``, cannot be
reached by module hooks; the engine then expands the enclosing block instead).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.interventions.inputs import num_samples, run, take

PerSampleArguments = dict[str, tuple[frozenset[int], frozenset[str]]]
"""``{module name: (positions, keywords)}`` of each module's per-sample tensor arguments."""


def per_sample_arguments(model: nn.Module, inputs: Any) -> PerSampleArguments:
    """The per-sample tensor arguments of every module call (see the module docstring).

    Args:
        model: The network (eval mode).
        inputs: ``[n, ...]`` probe inputs (a tensor, or a tuple/dict of tensors).

    Returns:
        ``{module name: (argument positions, keyword names)}``, only modules that have some;
        empty with fewer than 3 samples.
    """
    if num_samples(inputs) < 3:
        return {}
    found = [_arguments_with_rows(model, take(inputs, 0, n), n) for n in (2, 3)]
    out = {}
    for name in found[0].keys() & found[1].keys():
        positions = frozenset(found[0][name][0] & found[1][name][0])
        keywords = frozenset(found[0][name][1] & found[1][name][1])
        if positions or keywords:
            out[name] = (positions, keywords)
    return out


def _arguments_with_rows(
    model: nn.Module, inputs: Any, rows: int
) -> dict[str, tuple[set[int], set[str]]]:
    """Arguments of each module whose axis 0 has ``rows`` rows, in every call of the module."""
    seen: dict[str, tuple[set[int], set[str]]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            positions = {i for i, a in enumerate(args) if _has_rows(a, rows)}
            keywords = {k for k, v in kwargs.items() if _has_rows(v, rows)}
            if name in seen:  # a module called twice: what is per-sample in every call
                positions &= seen[name][0]
                keywords &= seen[name][1]
            seen[name] = (positions, keywords)

        return record

    handles = [
        m.register_forward_pre_hook(hook(name), with_kwargs=True)
        for name, m in model.named_modules()
        if not isinstance(m, torch.jit.ScriptModule)  # takes no hooks: its arguments stay
    ]
    try:
        with torch.no_grad():
            run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _has_rows(value: Any, rows: int) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == rows


@contextmanager
def repeated_arguments(
    model: nn.Module,
    arguments: PerSampleArguments,
    copies: int,
    samples: int,
    active: Callable[[], bool],
    keep: Callable[[Tensor], bool],
) -> Iterator[None]:
    """Within the block, per-sample arguments on ``samples`` rows are repeated ``copies`` times.

    Args:
        model: The network.
        arguments: From :func:`per_sample_arguments`.
        copies: ``m``, the masks of the pass.
        samples: ``n``, the samples of the pass.
        active: Whether the first point has run (modules called before it are left alone).
        keep: Tensors never repeated (the first point's output held for the shortcut).
    """
    named = dict(model.named_modules())

    def repeat(value: Any) -> Any:
        if _has_rows(value, samples) and not keep(value):
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        return value

    def make_hook(positions: frozenset[int], keywords: frozenset[str]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not active():
                return None
            new_args = tuple(repeat(a) if i in positions else a for i, a in enumerate(args))
            new_kwargs = {k: repeat(v) if k in keywords else v for k, v in kwargs.items()}
            return new_args, new_kwargs

        return hook

    handles = []
    if copies > 1:
        handles = [
            named[name].register_forward_pre_hook(make_hook(*spec), with_kwargs=True)
            for name, spec in arguments.items()
            if name in named
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
