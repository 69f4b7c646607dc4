r"""Which axis of a layer's output holds the samples: found by permuting samples, not by shape.

Per-layer probes index a layer's output by sample: a kernel row is ``(sample, output)``, a
unit's activity is averaged per sample. Most layers put the samples on axis 0, but not all:
``nn.TransformerEncoderLayer(batch_first=False)`` (PyTorch's default) sees ``[T, n, d]``, and a
shape test cannot tell ``T`` from ``n`` when they are equal. Here the probe inputs are permuted
along the batch (a cyclic shift of ``m`` distinct samples, :math:`\pi`) and each layer's output
is compared with its unpermuted output: the sample axis :math:`s` is the one with

.. math:: h(\pi x) = \operatorname{roll}(h(x), 1, \text{axis}=s),

and it must be the only axis with that property. A layer where none or several axes qualify
(samples mixed, e.g. BatchNorm in train mode; outputs that do not depend on the input, or are
not finite) gets ``None`` and is refused by the probes that need it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import map_tensors, model_arguments, slice_rows
from lightning_probes.core.hooks import capture


def roll_samples(inputs: Any, shift: int = 1) -> Any:
    """``inputs`` with its samples cyclically shifted: sample ``i`` moves to ``i + shift``.

    Args:
        inputs: A tensor ``[m, ...]`` or a tuple/list/dict of them (same ``m``).
        shift: Positions to shift by.
    """
    return map_tensors(inputs, lambda t: t.roll(shift, 0))


def find_sample_axes(
    model: nn.Module, inputs: Any, layers: Mapping[str, nn.Module], *, num_samples: int = 3
) -> dict[str, int | None]:
    """The axis of each layer's output that indexes the samples (``None``: not identifiable).

    Runs the model twice without gradients on the first ``num_samples`` probe samples, once as
    they are and once cyclically shifted (:func:`roll_samples`), and compares every layer's
    outputs exactly (to a relative ``1e-6`` of their scale, for reduction-order rounding).

    Args:
        model: The network, in the mode the probe evaluates it (usually ``eval()``).
        inputs: Probe inputs (a tensor, tuple or dict of tensors sharing the batch axis), at
            least ``num_samples`` distinct samples.
        layers: ``{name: module}`` whose output (a tensor) is inspected.
        num_samples: Samples used; 3 (not 2) so that a shift is not its own inverse.

    Returns:
        ``{name: axis or None}``; a layer not called, or not returning a tensor, gives ``None``.

    Example:
        >>> class SeqFirst(nn.Module):  # batch-first inputs, a sequence-first layer inside
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        ...     def forward(self, x):  # x: [n, T, 8]
        ...         return self.enc(x.transpose(0, 1)).mean(0)
        >>> net = SeqFirst().eval()
        >>> find_sample_axes(net, torch.randn(3, 3, 8), {"linear1": net.enc.linear1})
        {'linear1': 1}
    """
    x = slice_rows(inputs, 0, num_samples)
    with torch.no_grad(), capture(dict(layers)) as rec:
        args, kwargs = model_arguments(x)
        model(*args, **kwargs)
        plain = {k: r.outputs[:] for k, r in rec.items()}
        for r in rec.values():
            r.outputs.clear()
        args, kwargs = model_arguments(roll_samples(x))
        model(*args, **kwargs)
        rolled = {k: r.outputs[:] for k, r in rec.items()}
    return {k: _axis(plain[k], rolled[k], num_samples) for k in layers}


def _axis(plain: list[Tensor], rolled: list[Tensor], m: int) -> int | None:
    if len(plain) != 1 or len(rolled) != 1 or plain[0].shape != rolled[0].shape:
        return None
    a, b = plain[0].double(), rolled[0].double()
    if not (bool(a.isfinite().all()) and bool(b.isfinite().all())):
        return None  # NaN/inf outputs cannot be compared: not identifiable
    tol = 1e-6 * max(float(a.abs().max()), 1e-30)
    found = [
        s
        for s in range(a.ndim)
        if a.shape[s] == m
        and not torch.allclose(a, b, rtol=0, atol=tol)  # the output depends on the sample
        and torch.allclose(a.roll(1, s), b, rtol=0, atol=tol)
    ]
    return found[0] if len(found) == 1 else None
