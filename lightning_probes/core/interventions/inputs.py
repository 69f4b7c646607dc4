"""Probe inputs of any structure for the interventions: a tensor, a tuple or a dict of tensors.

Every tensor shares the sample axis 0 (``input_ids`` with ``attention_mask``); the model is
called as ``model(x)``, ``model(*args)`` or ``model(**kwargs)``
(:func:`~lightning_probes.core.data.model_arguments`). Slicing, repeating and counting samples
go through here so that every path (tracing on two samples, chunks, the expanded batch of
masks, the statistics passes) treats all of them alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import map_tensors, model_arguments, slice_rows


def tensors(inputs: Any) -> list[Tensor]:
    """Every tensor in ``inputs``, in order.

    Raises:
        TypeError: If ``inputs`` holds something other than tensors, dicts, tuples and lists,
            or no tensor at all.
    """
    out: list[Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            out.append(v)
        elif isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (tuple, list)):
            for x in v:
                walk(x)
        else:
            raise TypeError(
                "Expected `inputs` to be a Tensor, or a tuple/list/dict of Tensors sharing the "
                f"batch dimension, got {type(v).__name__}."
            )

    walk(inputs)
    if not out:
        raise TypeError("Expected `inputs` to hold at least one Tensor, got none.")
    return out


def num_samples(inputs: Any) -> int:
    """The number of samples ``n`` (axis 0, the same for every tensor).

    Raises:
        ValueError: If the tensors disagree on axis 0 (or one is 0-d).
    """
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in tensors(inputs)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "Expected every tensor of `inputs` to share the sample axis 0, got shapes "
            f"{[tuple(t.shape) for t in tensors(inputs)]}."
        )
    return sizes.pop()


def take(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor in ``inputs``."""
    return slice_rows(inputs, start, stop)


def repeat_samples(inputs: Any, m: int) -> Any:
    """``m`` copies of the samples, copy-major: sample ``i`` of copy ``k`` at row ``k·n + i``."""
    return map_tensors(inputs, lambda t: t.repeat(m, *([1] * (t.ndim - 1))))


def device_of(inputs: Any) -> torch.device:
    """The device of the first tensor of ``inputs``."""
    return tensors(inputs)[0].device


def run(model: nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*args)`` or ``model(**kwargs)`` as ``inputs`` says."""
    args, kwargs = model_arguments(inputs)
    return model(*args, **kwargs)
