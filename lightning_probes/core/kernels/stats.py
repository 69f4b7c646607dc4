r"""Layer alignment statistics streamed block by block, one layer's kernel at a time.

Only what the alignment needs is accumulated (in float64) over kernel blocks of
``chunk_size`` samples, so neither all layers' kernels nor, with ``chunk_size``, one whole
``(n·o, n·o)`` kernel is ever held. For the sample-centred kernel of each output pair
:math:`K^{cd}` (``n × n``), with :math:`H = I - 11^T/n`,

.. math::
    \|H K^{cd} H\|_F^2 = \|K^{cd}\|_F^2 - \tfrac1n \|K^{cd} 1\|^2 - \tfrac1n \|K^{cd\,T} 1\|^2
                         + \tfrac{1}{n^2} (1^T K^{cd} 1)^2,

and since the centred labels satisfy :math:`H\tilde y = \tilde y`,
:math:`\tilde y^T K_c \tilde y = \tilde y^T K \tilde y`. The alignment is then
:math:`A = \tilde y^T K_c \tilde y / (\|K_c\|_F \|\tilde y\|^2)` (Lou et al. 2022, eq. (7)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.evaluation import OutputFn
from lightning_probes.core.kernels.factors import AffineFactors, LayerFactors, sample_spans
from lightning_probes.core.kernels.tangent import KernelMethod, Layers, tangent_kernel_factors
from lightning_probes.functional.alignment import (
    Centering,
    center,
    centered_labels,
)
from lightning_probes.functional.linalg import self_gram, top_abs_eigenvalue


@dataclass
class KernelStatistics:
    r"""Alignment statistics of one layer's tangent kernel (0-d float64 tensors).

    Attributes:
        alignment: :math:`A_l = \tilde y^T K_c \tilde y / (\|K_c\|_F \|\tilde y\|^2)`.
        frobenius: :math:`\|K_c\|_F`.
        trace: :math:`\operatorname{Tr} K` (uncentred; bounds the output change, eq. (4)).
        label_energy: :math:`\tilde y^T K_c \tilde y` (squared norm of the layer's gradient of
            :math:`\sum_i \tilde y_i^T f(x_i)`).
        stable_rank: :math:`\|K_c\|_F^2 / \|K_c\|_2^2` (NaN when not computed).
        kernel: The full kernel ``(n·o, n·o)`` when ``keep_kernel=True``, else ``None``.
    """

    alignment: Tensor
    frobenius: Tensor
    trace: Tensor
    label_energy: Tensor
    stable_rank: Tensor
    kernel: Tensor | None = None


def kernel_statistics(
    factors: LayerFactors,
    targets: Tensor,
    *,
    centering: Centering = "samples",
    chunk_size: int | None = None,
    stable_rank: bool = True,
    keep_kernel: bool = False,
) -> KernelStatistics:
    """Alignment statistics of one layer from its kernel factors, in one pass over blocks.

    Args:
        factors: From :func:`~lightning_probes.core.kernels.tangent_kernel_factors`.
        targets: ``[n]`` class indices (``o`` classes) or ``[n, o]`` float targets.
        centering: ``"samples"`` (authors' code) or ``"full"`` (paper eq. (6)).
        chunk_size: Samples per block (``None``: one block, the whole kernel).
        stable_rank: Compute the stable rank. Exact from the kernel without ``chunk_size``;
            with it, by block Lanczos whose every step streams all blocks again (costly).
        keep_kernel: Also return the kernel (only without ``chunk_size``).

    Returns:
        :class:`KernelStatistics`.
    """
    n, o = factors.num_samples, factors.num_outputs
    y = centered_labels(targets, o, centering).reshape(n, o).to(factors_device(factors))
    spans = sample_spans(n, chunk_size)
    jac = _narrow_jacobian(factors) if len(spans) == 1 and not keep_kernel else None
    if jac is not None:
        return _statistics_from_rows(jac, y, centering, stable_rank)
    f64 = torch.float64
    sq = torch.zeros((), dtype=f64, device=y.device)
    quad = torch.zeros((), dtype=f64, device=y.device)
    trace = torch.zeros((), dtype=f64, device=y.device)
    rows = torch.zeros(n, o, o, dtype=f64, device=y.device)  # rows[i,c,d] = Σ_j K[i,c,j,d]
    whole: Tensor | None = None
    for a, r in enumerate(spans):
        for s in spans[a:]:
            raw = factors.block(r, s)
            blk = raw.to(f64).view(r.stop - r.start, o, s.stop - s.start, o)
            if len(spans) == 1:
                whole = raw
            twice = 1.0 if r == s else 2.0
            sq += twice * blk.square().sum()
            size_r, size_s = (r.stop - r.start) * o, (s.stop - s.start) * o
            quad += twice * (blk.view(size_r, size_s) @ y[s].reshape(-1)) @ y[r].reshape(-1)
            rows[r] += blk.sum(2)
            if r == s:
                trace += torch.diagonal(raw).to(f64).sum()
            else:
                rows[s] += blk.sum(0).permute(1, 2, 0)
    if centering == "samples":
        total = rows.sum(0)
        frob2 = sq - 2.0 / n * rows.square().sum() + total.square().sum() / n**2
    else:
        per_row = rows.sum(2)
        frob2 = sq - 2.0 / (n * o) * per_row.square().sum() + per_row.sum() ** 2 / (n * o) ** 2
    frob = frob2.clamp_min(0).sqrt()
    alignment = quad / (frob * y.square().sum())
    rank = torch.tensor(float("nan"), dtype=f64, device=y.device)
    if stable_rank:
        if whole is not None:
            # in the kernel's own dtype: a float32 kernel's eigenvalues are float32-accurate
            # anyway, and its products cost half
            top = _top_eigenvalue(_native_matmul(whole), n, o, centering, y.device,
                                  tol=_eigen_tol(whole.dtype))  # fmt: skip
        else:
            top = _top_eigenvalue(_streamed_matmul(factors, spans, o), n, o, centering, y.device)
        rank = frob2 / top**2
    return KernelStatistics(alignment, frob, trace, quad, rank, whole if keep_kernel else None)


def _narrow_jacobian(factors: LayerFactors) -> Tensor | None:
    """Per-sample gradients ``J`` ``[n·o, P]`` of a narrow layer (``P < n·o``), else ``None``.

    For such a layer the statistics are cheaper from ``J`` than from the kernel.
    """
    n, o = factors.num_samples, factors.num_outputs
    if isinstance(factors, AffineFactors):
        return factors.kernel_rows(slice(0, n)) if factors.num_params < n * o else None
    rows = factors.rows(slice(0, n))  # cached: the kernel path reuses it
    return rows if rows.shape[1] < n * o else None


def _statistics_from_rows(
    rows: Tensor, y: Tensor, centering: Centering, stable_rank: bool
) -> KernelStatistics:
    r"""The statistics of :math:`K = J J^T` from :math:`J` (``[n·o, P]``, ``P < n·o``).

    With :math:`J_c = C J` (centred over samples per output, or over all rows), :math:`K_c =
    J_c J_c^T` shares its non-zero spectrum with the ``P x P`` Gram :math:`G = J_c^T J_c`:
    :math:`\|K_c\|_F = \|G\|_F`, :math:`\|K_c\|_2 = \lambda_{max}(G)` (``eigvalsh`` up to
    ``P = 128``, above by block Lanczos to a relative 1e-10, or 10 ulps of a float32 ``J``),
    :math:`\tilde y^T K_c \tilde y = \|J_c^T \tilde y\|^2` and
    :math:`\operatorname{Tr} K = \|J\|_F^2`; :math:`(n o)^2` kernel entries are never formed.
    """
    f64 = torch.float64
    n, o = y.shape
    # in J's own dtype, as the wide path forms K (a float32 J's kernel is float32-accurate
    # anyway, and its Gram costs half); every sum of squares accumulates in float64
    trace = rows.square().sum(dtype=f64)
    jc = center(rows.view(n, o, -1), centering).view(n * o, -1)
    gram = self_gram(jc.T)
    frob2 = gram.square().sum(dtype=f64)
    frob = frob2.sqrt()
    quad = (jc.T @ y.reshape(-1).to(jc.dtype)).square().sum(dtype=f64)
    alignment = quad / (frob * y.square().sum())
    rank = torch.tensor(float("nan"), dtype=f64, device=rows.device)
    if stable_rank:
        # the top eigenvalue only: block Lanczos above 128 (the full spectrum of a 2304 x 2304
        # float64 Gram costs more than the layer's kernel statistics)
        if gram.shape[0] <= 128:
            top = torch.linalg.eigvalsh(gram.to(f64)).abs().max()
        else:
            top = top_abs_eigenvalue(
                _native_matmul(gram), gram.shape[0], dtype=f64, device=gram.device,
                tol=_eigen_tol(gram.dtype),
            )  # fmt: skip
        rank = frob2 / top**2
    return KernelStatistics(alignment, frob, trace, quad, rank, None)


def layer_alignments(
    model: nn.Module,
    inputs: Any,
    targets: Tensor,
    *,
    layers: Layers = None,
    output_fn: OutputFn | None = None,
    centering: Centering = "samples",
    chunk_size: int | None = None,
    stable_rank: bool = True,
    keep_kernels: bool = False,
    method: KernelMethod = "auto",
) -> dict[str, KernelStatistics]:
    r"""Alignment :math:`A_l` of every layer's tangent kernel with the labels, layer by layer.

    One forward and one batched backward collect all layers' factors; then each layer's kernel
    is formed (or streamed in blocks), reduced to its statistics and dropped before the next.

    Args:
        model: The network (BatchNorm in eval mode); not modified.
        inputs: ``[n, ...]`` probe inputs (or a tuple of positional inputs).
        targets: ``[n]`` class indices in ``[0, o)`` or ``[n, o]`` float targets.
        layers: As in :func:`~lightning_probes.core.kernels.layer_tangent_kernels`.
        output_fn: Maps the model output to logits ``[n, o]``.
        centering: ``"samples"`` (authors' code, default) or ``"full"`` (paper eq. (6)).
        chunk_size: Samples per forward/backward and per kernel block.
        stable_rank: Also compute the stable rank of :math:`K_c`.
        keep_kernels: Return each layer's kernel too (memory: all of them).
        method: Kernel path, see :func:`~lightning_probes.core.kernels.layer_tangent_kernels`.

    Returns:
        ``{layer name: KernelStatistics}``.
    """
    factors = tangent_kernel_factors(
        model, inputs, layers=layers, output_fn=output_fn, chunk_size=chunk_size, method=method
    )
    out = {}
    for name in list(factors):
        f = factors.pop(name)  # drop each layer's factors (and kernel) once reduced
        out[name] = kernel_statistics(
            f,
            targets,
            centering=centering,
            chunk_size=chunk_size,
            stable_rank=stable_rank,
            keep_kernel=keep_kernels and chunk_size is None,
        )
    return out


def factors_device(factors: LayerFactors) -> torch.device:
    """Device of a layer's factors."""
    first = getattr(factors, "features", None)
    if isinstance(first, Tensor):
        return first.device
    return factors.block(slice(0, 1), slice(0, 1)).device


def _streamed_matmul(
    factors: LayerFactors, spans: list[slice], o: int
) -> Callable[[Tensor], Tensor]:
    """``u -> K u`` streaming the kernel's blocks (never holding ``K``)."""

    def matmul(u: Tensor) -> Tensor:
        w = torch.zeros_like(u)
        for a, r in enumerate(spans):
            for s in spans[a:]:
                blk = factors.block(r, s).to(torch.float64)
                w[r.start * o : r.stop * o] += blk @ u[s.start * o : s.stop * o]
                if r != s:
                    w[s.start * o : s.stop * o] += blk.T @ u[r.start * o : r.stop * o]
        return w

    return matmul


def _native_matmul(kernel: Tensor) -> Callable[[Tensor], Tensor]:
    """``u -> K u`` computed in the kernel's dtype, returned in ``u``'s."""
    return lambda u: (kernel @ u.to(kernel.dtype)).to(u.dtype)


def _eigen_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the top eigenvalue: 1e-10, or 10 ulps of a lower-precision kernel."""
    return max(1e-10, 10 * torch.finfo(dtype).eps)


def _top_eigenvalue(
    matmul: Callable[[Tensor], Tensor],
    n: int,
    o: int,
    centering: Centering,
    device: torch.device,
    iters: int = 300,
    block: int = 16,
    tol: float = 1e-10,
) -> Tensor:
    """Top eigenvalue of :math:`K_c` by block Lanczos, centring implicitly.

    :math:`K_c u = C K C u` with :math:`C` the centring projector, so ``K_c`` is never formed
    (:func:`~lightning_probes.functional.linalg.top_abs_eigenvalue` only needs products).
    """

    def center_rows(m: Tensor) -> Tensor:  # C m for a [n·o, k] block
        return center(m.view(n, o, -1), centering).view(n * o, -1)

    return top_abs_eigenvalue(
        lambda u: center_rows(matmul(center_rows(u))),
        n * o,
        dtype=torch.float64,
        device=device,
        block=block,
        tol=tol,
        max_iter=iters,
    )
