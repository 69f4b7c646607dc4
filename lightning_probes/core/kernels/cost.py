r"""What one run of the layer-kernel probe costs, in dense flops and bytes streamed.

For each layer ``l`` with :math:`P_l` parameters on ``n`` samples and ``o`` outputs, the
tangent kernel :math:`K_l = J_l J_l^T` is ``(no) x (no)``. Its product costs, in
multiply-adds, :math:`(no)^2 d_{out} + n^2 (d_{in} + 1)` for a Linear layer (the
forward/backward factorisation of Baratin et al.) and :math:`(no)^2 P_l` through per-sample
gradients otherwise; a layer with fewer parameters than kernel rows (``P < no``) forms its
``P x P`` Gram from the Jacobian instead, :math:`n o P^2 + 5 P^3`. The statistics read the
kernel about six times in float64, and the stable rank's block Lanczos about fifteen times.
These are estimates for the wall-time budget's first-run prediction, good to a small factor.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def kernel_probe_cost(
    layers: Iterable[nn.Module],
    num_samples: int,
    num_outputs: int,
    *,
    chunk_size: int | None = None,
    stable_rank: bool = True,
) -> tuple[float, float]:
    r"""Dense flops and bytes streamed of one exact kernel run over ``layers``.

    Args:
        layers: The layers whose kernels are formed.
        num_samples: ``n``, the probe set's size.
        num_outputs: ``o``, outputs per sample.
        chunk_size: The probe's ``chunk_size`` (chunked kernels never take the ``P x P`` path).
        stable_rank: Whether the stable rank is computed (about 15 more kernel passes).

    Returns:
        ``(flops, memory_bytes)``.

    Example:
        >>> kernel_probe_cost([nn.Linear(3, 2)], num_samples=4, num_outputs=2)
        (384.0, 6912.0)
    """
    n, o = num_samples, num_outputs
    no2 = float(n * o) ** 2
    flops = passes = 0.0
    for module in layers:
        size = sum(p.numel() for p in module.parameters())
        if size < n * o and chunk_size is None:  # statistics from J: P x P Gram
            flops += 2 * n * o * size**2 + 10 * size**3
            continue
        if isinstance(module, nn.Linear):
            flops += 2 * (no2 * module.out_features + n**2 * (module.in_features + 1))
        else:
            flops += 2 * no2 * size
        # statistics: ~6 float64 passes over the kernel; stable rank: ~15 products with it
        passes += 6 * 8 + (15 * 4 if stable_rank else 0)
    return flops, passes * no2
