"""Few host synchronisations: comparisons and reductions over many tensors read back at once.

On a GPU every ``float(t)``, ``bool(t)``, ``t.item()`` or ``torch.equal`` waits for the queued
work to finish and copies a value back. Done per parameter at every training step, that is
hundreds of stalls per step on a large model. The helpers here reduce on the device and read
back once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def tensors_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Whether ``a`` and ``b`` hold the same names, shapes and values, with one synchronisation.

    Values compare like :func:`torch.equal` (elementwise ``==``: NaN differs from itself, and
    ``-0.0`` equals ``0.0``); names and shapes are compared on the host first.

    Example:
        >>> tensors_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
        True
        >>> tensors_equal({"w": torch.ones(2)}, {"w": torch.zeros(2)})
        False
    """
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return False
    if not a:
        return True
    flags = [torch.eq(a[k], b[k].to(a[k].device)).all() for k in a]
    device = flags[0].device  # tensors may live on several devices (model parallel)
    return bool(torch.stack([f.to(device) for f in flags]).all())


def to_floats(values: Sequence[Tensor | float]) -> list[float]:
    """``[float(v) for v in values]`` with one synchronisation for all the tensors.

    Example:
        >>> to_floats([torch.tensor(1.5), 2.0, torch.tensor(-1.0, dtype=torch.float64)])
        [1.5, 2.0, -1.0]
    """
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]  # type: ignore[arg-type]
    device = tensors[0].device
    read = iter(torch.stack([t.detach().reshape(()).double().to(device) for t in tensors]).tolist())
    return [next(read) if isinstance(v, Tensor) else float(v) for v in values]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` when it is a CUDA device in use; else nothing.

    Called before reading a wall clock, so that training work still queued on the GPU is not
    charged to the probe that happens to start or stop a timer.
    """
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)
