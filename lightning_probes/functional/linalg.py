r"""The Gram matrix :math:`X X^T` of a tall or wide matrix, each off-diagonal block once.

A tangent kernel is :math:`K = J J^T` (Jacot et al. 2018; per layer, Lou et al. 2022), and its
product dominates the cost of :mod:`lightning_probes.core.kernels` whenever the layer has many
parameters. ``torch`` exposes no symmetric rank-k update (BLAS ``syrk``), and a plain
``x @ x.T`` computes both triangles. Splitting the rows in two,

.. math::
    X X^T = \begin{pmatrix} X_1 X_1^T & X_1 X_2^T \\ (X_1 X_2^T)^T & X_2 X_2^T \end{pmatrix},

computes the off-diagonal block once and recurses on the diagonal ones: with ``d`` levels the
multiply-adds fall to :math:`1/2 + 1/2^{d+1}` of the plain product's. The leaves stay large
enough (at least ``leaf_rows`` rows) for the GEMM to run at full rate. On a 2-core CPU
(``benchmarks/bench_gram.py``) the 640-row Jacobians of the CNN in ``bench_kernels.py`` took
0.72-0.81x the time of ``x @ x.T``, and a 2560-row one 0.65x.
"""

from __future__ import annotations

import torch
from torch import Tensor

LEAF_ROWS = 128
"""Rows below which a diagonal block is one plain product (at 2x this, it is split once)."""


def self_gram(x: Tensor, *, leaf_rows: int = LEAF_ROWS) -> Tensor:
    r""":math:`X X^T` of a 2-D ``x`` (``[m, k]`` → ``[m, m]``), equal to ``x @ x.T`` up to rounding.

    Each off-diagonal block is the exact transpose of its mirror (a leaf block is as
    symmetric as the GEMM makes it). Inputs that require a gradient get the plain product
    (the blockwise fill writes into a preallocated output, which autograd cannot follow).

    Args:
        x: ``[m, k]`` matrix, any strides (e.g. a transposed view for :math:`X^T X`).
        leaf_rows: Diagonal blocks with fewer than ``2 * leaf_rows`` rows are not split.

    Returns:
        ``[m, m]`` Gram matrix in ``x``'s dtype and device.

    Example:
        >>> x = torch.randn(600, 40, dtype=torch.float64)
        >>> bool(torch.allclose(self_gram(x), x @ x.T))
        True
    """
    if x.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix, got shape {tuple(x.shape)}.")
    m, leaf_rows = x.shape[0], max(1, leaf_rows)
    if m < 2 * leaf_rows or (x.requires_grad and torch.is_grad_enabled()):
        return x @ x.T
    out = x.new_empty(m, m)
    with torch.no_grad():
        _fill(x, out, leaf_rows)
    return out


def _fill(x: Tensor, out: Tensor, leaf_rows: int) -> None:
    """Write ``x @ x.T`` into the square view ``out``."""
    m = x.shape[0]
    if m < 2 * leaf_rows:
        torch.mm(x, x.T, out=out)
        return
    h = m // 2
    _fill(x[:h], out[:h, :h], leaf_rows)
    _fill(x[h:], out[h:, h:], leaf_rows)
    torch.mm(x[:h], x[h:].T, out=out[:h, h:])
    out[h:, :h] = out[:h, h:].T
