"""Cost units to predict a probe's first run before it has run once.

A probe's wall-time budget (``max_overhead``) predicts each run by the measured cost of the
previous one; the first run has no previous one. :func:`calibrate` measures, once, the units a
probe states its cost in: one forward pass of the model over the probe set, the dense matmul
rate of the device, and the cost of one figure. A probe's prediction is then a count of such
units (e.g. "110 forward passes plus two figures"), priced by this machine and this model.

These are estimates, good to a small factor, used only to decide *whether* the first run fits
in the budget; every later run is predicted by the measured cost of the run before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn, as_logits, call_model, chunks

#: Seconds of one figure before any was drawn in this process (drawing + PNG rendering).
FIGURE_SECONDS_GUESS = 0.15
#: Seconds of the first ``import matplotlib.figure`` (paid once per process).
MATPLOTLIB_IMPORT_GUESS = 0.5
_figure_seconds: list[float] = []


def record_figure_seconds(seconds: float) -> None:
    """Record how long one figure took to draw and render (called by the logging helpers)."""
    _figure_seconds.append(seconds)
    del _figure_seconds[:-16]


def figure_seconds() -> float:
    """Median measured cost of one figure in this process (a guess before the first one)."""
    if not _figure_seconds:
        first = 0.0 if "matplotlib.figure" in sys.modules else MATPLOTLIB_IMPORT_GUESS
        return FIGURE_SECONDS_GUESS + first
    ordered = sorted(_figure_seconds)
    return ordered[len(ordered) // 2]


@dataclass(frozen=True)
class CostUnits:
    """Measured prices of the units a probe's cost is stated in.

    Attributes:
        forward_seconds: One forward pass of the model over the whole probe set, no autograd.
        num_samples: ``n``, the probe set's size.
        num_outputs: ``o``, the size of one sample's (flattened) output.
        flops_per_second: Dense matrix-product rate on the model's device, in its dtype.
        bytes_per_second: Memory-bound rate on that device: bytes of a large matrix streamed
            through a product with a thin block (as in matrix-free eigensolvers).
        figure_seconds: One figure, drawn and rendered (see :func:`figure_seconds`).
    """

    forward_seconds: float
    num_samples: int
    num_outputs: int
    flops_per_second: float
    bytes_per_second: float
    figure_seconds: float

    def seconds(
        self,
        *,
        forwards: float = 0.0,
        flops: float = 0.0,
        memory_bytes: float = 0.0,
        figures: int = 0,
    ) -> float:
        """Predicted seconds of so many forward passes, dense flops, bytes moved and figures."""
        return (
            forwards * self.forward_seconds
            + flops / self.flops_per_second
            + memory_bytes / self.bytes_per_second
            + figures * self.figure_seconds
        )


def calibrate(
    model: nn.Module, data: ProbeSet, *, output_fn: OutputFn | None = None, chunk_size: int = 1024
) -> CostUnits:
    """Measure :class:`CostUnits` for ``model`` on the probe inputs (a few milliseconds).

    The forward pass is timed on its second call (the first pays one-time warm-up costs); the
    matmul rate from a ``512 x 512`` product in the model's dtype on its device and the
    memory-bound rate from a ``4096 x 4096`` float32 matrix times a ``4096 x 16`` block, both
    once per process.

    Args:
        model: The model, in the mode the probe will run it (eval, inside ``isolated``).
        data: The probe set.
        output_fn: Maps the model's output to logits, if it is not a tensor.
        chunk_size: Samples per forward call, as the probes evaluate.

    Returns:
        The measured units.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    pieces = chunks(data, chunk_size)
    with torch.no_grad():
        out = as_logits(call_model(model, None, pieces[0][0]), output_fn)
        num_outputs = int(out[0].numel()) if out.ndim else 1
        _sync(device)
        start = time.perf_counter()
        for piece, _, _ in pieces:
            as_logits(call_model(model, None, piece), output_fn)
        _sync(device)
        forward = time.perf_counter() - start
    flops, bandwidth = _machine_rates(device, dtype)
    return CostUnits(
        forward_seconds=forward,
        num_samples=len(data),
        num_outputs=num_outputs,
        flops_per_second=flops,
        bytes_per_second=bandwidth,
        figure_seconds=figure_seconds(),
    )


_rates: dict[tuple[torch.device, torch.dtype], tuple[float, float]] = {}
_calibration_seconds: list[float] = [0.0]


def machine_calibration_seconds() -> float:
    """Seconds spent so far in this process measuring the machine's rates (once per device)."""
    return _calibration_seconds[0]


def clear_machine_rates() -> None:
    """Forget the measured machine rates, so that the next :func:`calibrate` measures again."""
    _rates.clear()


def format_seconds(seconds: float) -> str:
    """A duration for messages: ``"4.0 ms"``, ``"1.25 s"``, ``"3.5 min"``, ``"2.1 h"``."""
    if seconds != seconds or seconds == float("inf"):
        return "never"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120.0:
        return f"{seconds:.2f} s"
    if seconds < 7200.0:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _machine_rates(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """``(flops/s, bytes/s)`` of ``device`` in ``dtype``, measured once per process."""
    if (device, dtype) not in _rates:
        started = time.perf_counter()
        with torch.no_grad():
            a = torch.randn(512, 512, device=device, dtype=dtype)
            matmul = _second_call_seconds(lambda: a @ a, device)
            # memory-bound rate as the probes meet it: a 64 MiB matrix times a thin block
            big = torch.ones(4096, 4096, device=device)
            thin = torch.ones(4096, 16, device=device)
            moved = _second_call_seconds(lambda: big @ thin, device)
        _rates[device, dtype] = (2 * 512**3 / matmul, big.numel() * big.element_size() / moved)
        _calibration_seconds[0] += time.perf_counter() - started
    return _rates[device, dtype]


def _second_call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of the second of two calls of ``fn`` (the first pays one-time costs)."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - start, 1e-6)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
