"""Probe data: extracting ``(inputs, targets)`` from batches and drawing a fixed probe set.

Pure PyTorch (no Lightning), so a plain training loop can use the same probe set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

BatchToInputsTargets = Callable[[Any], tuple[Any, Tensor | None]]
"""``batch -> (inputs, targets)``; ``targets`` may be ``None`` for unlabelled data."""

_INPUT_KEYS = ("x", "input", "inputs", "features", "image", "images", "input_ids")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")


@dataclass
class ProbeSet:
    """A fixed set of samples a probe evaluates on.

    Attributes:
        inputs: Model inputs, ``[n, ...]`` (or any structure the model's forward accepts).
        targets: Targets ``[n, ...]`` or ``None``.
    """

    inputs: Any
    targets: Tensor | None

    def __len__(self) -> int:
        return int(_first_tensor(self.inputs).shape[0])

    def to(self, device: torch.device) -> ProbeSet:
        """Move inputs and targets to ``device``."""
        return ProbeSet(
            _to_device(self.inputs, device),
            None if self.targets is None else self.targets.to(device),
        )


def default_batch_to_inputs_targets(batch: Any) -> tuple[Any, Tensor | None]:
    """Split a batch of a common shape into ``(inputs, targets)``.

    Understands a tensor (inputs only), a tuple/list ``(inputs, targets, ...)``, and a dict
    with a target key (``y``, ``target``, ``targets``, ``label``, ``labels``) and/or an input key
    (``x``, ``input``, ``inputs``, ``features``, ``image``, ``images``, ``input_ids``). A dict
    keeps every key that is not the target: a single input key gives that tensor (the model is
    called as ``model(x)``); several keys (``input_ids`` with ``attention_mask``,
    ``token_type_ids``...) give a dict of them, and the model is called as ``model(**inputs)``
    (see :func:`model_arguments`).

    Raises:
        TypeError: For any other batch type, or a dict with neither an input nor a target key;
            pass ``batch_to_inputs_targets=`` to the probe.
    """
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], targets
    if isinstance(batch, Mapping):
        x_key = next((k for k in _INPUT_KEYS if k in batch), None)
        y_key = next((k for k in _TARGET_KEYS if k in batch), None)
        if x_key is None and y_key is None:
            raise TypeError(
                f"Expected a dict batch with one of the keys {_INPUT_KEYS + _TARGET_KEYS}, got "
                f"keys {sorted(map(str, batch))}. Pass `batch_to_inputs_targets=` to the probe."
            )
        rest = {k: v for k, v in batch.items() if k != y_key}
        inputs: Any = rest[x_key] if x_key is not None and len(rest) == 1 else rest
        return inputs, None if y_key is None else batch[y_key]
    raise TypeError(
        f"Expected a batch that is a Tensor, a tuple/list (inputs, targets) or a dict, got "
        f"{type(batch).__name__}. Pass `batch_to_inputs_targets=` to the probe."
    )


def model_arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How probe inputs are passed to the model: ``(args, kwargs)`` of ``model(*args, **kwargs)``.

    A tensor is one positional argument (``model(x)``), a tuple is the positional arguments
    (``model(*args)``), a mapping the keyword arguments (``model(**kwargs)``, e.g. HF
    ``input_ids`` with ``attention_mask``).
    """
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (inputs,), {}


def probe_set_from_tensors(data: Any) -> ProbeSet:
    """Build a :class:`ProbeSet` from user-given probe data.

    Args:
        data: A tensor of inputs, a tuple ``(inputs, targets)``, or a map-style ``Dataset``
            (all of it is used).

    Raises:
        TypeError: If ``data`` is none of these.
        ValueError: If inputs and targets disagree on the number of samples, or it is empty.
    """
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return draw_probe_set(DataLoader(data, batch_size=256), size=None)
    if isinstance(data, Tensor):
        inputs, targets = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
    else:
        raise TypeError(
            "Expected `probe_data` to be a Tensor, a tuple (inputs, targets) or a map-style "
            f"Dataset, got {type(data).__name__}."
        )
    n = _first_tensor(inputs).shape[0]
    if n == 0:
        raise ValueError("Expected `probe_data` to hold at least one sample, got 0.")
    if targets is not None and (not isinstance(targets, Tensor) or targets.shape[0] != n):
        raise ValueError(
            f"Expected `probe_data` targets to be a Tensor with {n} rows like the inputs, got "
            f"{getattr(targets, 'shape', type(targets).__name__)}."
        )
    return ProbeSet(inputs, targets)


def draw_probe_set(
    loader: DataLoader,
    size: int | None,
    *,
    seed: int = 0,
    batch_to_inputs_targets: BatchToInputsTargets | None = None,
) -> ProbeSet:
    """Draw ``size`` samples from ``loader``'s dataset, reproducibly, without disturbing training.

    For a map-style dataset, indices are drawn with a private ``torch.Generator`` seeded by
    ``seed`` (the same samples on every rank: the dataset, not the rank's sampler, is indexed)
    and collated with the loader's ``collate_fn``. The global RNG is not used. For an iterable
    dataset the first batches are taken in order from a fresh iterator (under a saved RNG state).

    Args:
        loader: The training dataloader.
        size: Number of samples; ``None`` takes the whole dataset. If the dataset is smaller,
            all of it is used.
        seed: Seed of the draw.
        batch_to_inputs_targets: How to split a collated batch; default
            :func:`default_batch_to_inputs_targets`.

    Returns:
        The probe set, on the CPU or wherever the dataset's tensors live.
    """
    split = batch_to_inputs_targets or default_batch_to_inputs_targets
    dataset = loader.dataset
    collate = loader.collate_fn
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        batches = []
        taken = 0
        with torch.random.fork_rng(devices=[]):
            for batch in loader:
                batches.append(split(batch))
                taken += len(ProbeSet(*batches[-1]))
                if size is not None and taken >= size:
                    break
        return _cat_probe_sets([ProbeSet(*b) for b in batches], size)
    n = len(dataset)  # type: ignore[arg-type]
    if size is None or size >= n:
        indices = torch.arange(n, device="cpu")
    else:  # on the CPU whatever the default device: the same samples on every machine
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(n, generator=generator, device="cpu")[:size].sort().values
    chunks = []
    for start in range(0, len(indices), 1024):
        batch = collate([dataset[int(i)] for i in indices[start : start + 1024]])
        chunks.append(ProbeSet(*split(batch)))
    return _cat_probe_sets(chunks, None)


def _cat_probe_sets(parts: list[ProbeSet], size: int | None) -> ProbeSet:
    inputs = _cat([p.inputs for p in parts])
    targets = None if parts[0].targets is None else torch.cat([p.targets for p in parts])  # type: ignore[misc]
    if size is not None:
        inputs = slice_rows(inputs, 0, size)
        targets = None if targets is None else targets[:size]
    return ProbeSet(inputs, targets)


def _cat(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, Mapping):
        return {k: _cat([v[k] for v in values]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([v[i] for v in values]) for i in range(len(first)))
    raise TypeError(f"Expected probe inputs made of tensors, got {type(first).__name__}.")


def slice_rows(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor in ``value`` (a tensor, or a dict/tuple/list of them).

    Raises:
        TypeError: If ``value`` holds something other than tensors, dicts, tuples and lists.
    """
    if isinstance(value, Tensor):
        return value[start:stop]
    if isinstance(value, Mapping):
        return {k: slice_rows(v, start, stop) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(slice_rows(v, start, stop) for v in value)
    raise TypeError(f"Expected probe inputs made of tensors, got {type(value).__name__}.")


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor of a tensor or tuple/list/dict structure (nested).

    Other leaves are returned as they are; containers keep their type.

    Example:
        >>> map_tensors({"ids": torch.arange(3), "n": 3}, lambda t: t.roll(1, 0))
        {'ids': tensor([2, 0, 1]), 'n': 3}
    """
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


def tensors_of(value: Any) -> list[Tensor]:
    """Every tensor of a tensor or tuple/list/dict structure (nested), in order.

    Other leaves are skipped.
    """
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def _to_device(value: Any, device: torch.device) -> Any:
    return map_tensors(value, lambda t: t.to(device))


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        return _first_tensor(next(iter(value.values())))
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    raise TypeError(f"Expected probe inputs made of tensors, got {type(value).__name__}.")
