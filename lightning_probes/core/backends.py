r"""Numerical backends inside a probe: float32 computed as float32, kernels that can do it all.

PyTorch's defaults on a GPU trade float32 fidelity for speed, and some fast kernels lack what a
probe needs. :func:`probe_backends` (entered by
:func:`~lightning_probes.core.isolation.isolated`, so for every probe's work) sets, and restores
on exit:

- **TF32 off.** cuDNN convolutions use TF32 (a 10-bit mantissa, relative error about
  :math:`10^{-3}`) by default, and ``torch.set_float32_matmul_precision("high")`` does the same
  for matmuls: a probe's float32 result would then differ from the CPU's far beyond float32
  rounding. Inside, matmuls and cuDNN run in full float32 (``"highest"``). Written with the
  API family the process uses (the legacy flags when they read consistently, else the
  ``fp32_precision`` strings of PyTorch >= 2.9), so neither family reads an error afterwards.
- **cuDNN off for models with an RNN** (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): cuDNN's RNN
  backward refuses eval mode ("cudnn RNN backward can only be called in training mode") and has
  no double backward, and probes differentiate in eval mode. PyTorch's native kernels then run
  the whole model (convolutions included: slower, same values).
- **The math kernel of scaled-dot-product attention**: the flash kernels (the CPU's too:
  "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
  implemented") and the memory-efficient one have no double backward, which Hessian-vector
  products need, and each rounds its own way; the math kernel is the reference, the same on
  every device.

Random numbers: probes draw them on the CPU, from seeded CPU generators, with an explicit
``device="cpu"`` (also under ``torch.set_default_device``), then move them to the model's
device: the draws, and so the probes' values, are the same on every machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

_LEGACY_FLAGS = (
    (torch.backends.cuda.matmul, "allow_tf32", False),
    (torch.backends.cudnn, "allow_tf32", False),
)


@contextmanager
def probe_backends(*, rnn: bool) -> Iterator[None]:
    """Full float32 matmuls and convolutions, and kernels that support probes (module docs).

    Args:
        rnn: The model has an ``nn.RNNBase`` module: disable cuDNN (eval-mode and double
            backward).

    Yields:
        Nothing; every flag is restored on exit, also after an error.

    Example:
        >>> torch.set_float32_matmul_precision("high")
        >>> with probe_backends(rnn=False):
        ...     torch.get_float32_matmul_precision()
        'highest'
        >>> torch.get_float32_matmul_precision()
        'high'
        >>> torch.set_float32_matmul_precision("highest")
    """
    with ExitStack() as stack:
        stack.enter_context(_full_float32())
        if rnn:
            enabled = torch.backends.cudnn.enabled
            torch.backends.cudnn.enabled = False
            stack.callback(setattr, torch.backends.cudnn, "enabled", enabled)
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN, in the API family the process uses; restored on exit."""
    strings = _precision_strings()
    saved_strings = [(obj, obj.fp32_precision) for obj in strings]
    try:
        legacy: list[tuple[Any, str, Any]] | None = [
            (obj, name, getattr(obj, name)) for obj, name, _ in _LEGACY_FLAGS
        ]
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new API set the flags: the legacy ones do not read consistently
        legacy, precision = None, ""
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")
            for obj, name, value in _LEGACY_FLAGS:
                setattr(obj, name, value)
        else:
            for obj in strings:
                obj.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(precision)
            for obj, name, value in legacy:
                setattr(obj, name, value)
        for obj, value in saved_strings:  # exactly as before (e.g. "none": inherit)
            obj.fp32_precision = value


def _precision_strings() -> list[Any]:
    """The backends with an ``fp32_precision`` string (PyTorch >= 2.9), GPU and CPU."""
    candidates = [
        getattr(torch.backends.cuda, "matmul", None),
        getattr(torch.backends.cudnn, "conv", None),
        getattr(torch.backends.cudnn, "rnn", None),
        getattr(getattr(torch.backends, "mkldnn", None), "matmul", None),
        getattr(getattr(torch.backends, "mkldnn", None), "conv", None),
        getattr(getattr(torch.backends, "mkldnn", None), "rnn", None),
    ]
    return [c for c in candidates if c is not None and hasattr(c, "fp32_precision")]
