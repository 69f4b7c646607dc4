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

Also here: the one (block) Lanczos of the package, :func:`block_lanczos`, behind the stable
rank of the alignment kernels (:func:`top_abs_eigenvalue`) and the top Hessian eigenvalues of
:mod:`lightning_probes.core.landscape.hessian`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

LEAF_ROWS = 64
"""Rows below which a diagonal block is one plain product (at 2x this, it is split once); leaves
of 64 rows still run at the GEMM rate of wide products on the 2-core CPU (a 640-row ``J`` of
BERT is split three times, to 9/16 of the plain product's multiply-adds)."""

_leaf_rows: ContextVar[int] = ContextVar("leaf_rows", default=LEAF_ROWS)


@contextmanager
def gram_leaf_rows(rows: int) -> Iterator[None]:
    """Within the block, :func:`self_gram` calls that do not pass ``leaf_rows`` use ``rows``.

    Chooses the Gram product of code that calls :func:`self_gram` inside (e.g.
    :func:`~lightning_probes.core.kernels.layer_tangent_kernels`): ``sys.maxsize`` gives the
    plain ``x @ x.T`` everywhere (``benchmarks/bench_gram.py`` compares the two this way).

    Example:
        >>> import sys
        >>> x = torch.randn(600, 40)
        >>> with gram_leaf_rows(sys.maxsize):
        ...     plain = self_gram(x)
        >>> bool(torch.equal(plain, x @ x.T))
        True
    """
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"Expected `rows` to be a positive int, got {rows!r}.")
    token = _leaf_rows.set(rows)
    try:
        yield
    finally:
        _leaf_rows.reset(token)


def self_gram(x: Tensor, *, leaf_rows: int | None = None) -> Tensor:
    r""":math:`X X^T` of a 2-D ``x`` (``[m, k]`` → ``[m, m]``), equal to ``x @ x.T`` up to rounding.

    Each off-diagonal block is the exact transpose of its mirror (a leaf block is as
    symmetric as the GEMM makes it). Inputs that require a gradient get the plain product
    (the blockwise fill writes into a preallocated output, which autograd cannot follow).

    Args:
        x: ``[m, k]`` matrix, any strides (e.g. a transposed view for :math:`X^T X`).
        leaf_rows: Diagonal blocks with fewer than ``2 * leaf_rows`` rows are not split
            (default :data:`LEAF_ROWS`, or the value set by :func:`gram_leaf_rows`); from
            ``m / 2`` up, the result is the plain product ``x @ x.T``.

    Returns:
        ``[m, m]`` Gram matrix in ``x``'s dtype and device.

    Example:
        >>> x = torch.randn(600, 40, dtype=torch.float64)
        >>> bool(torch.allclose(self_gram(x), x @ x.T))
        True
    """
    if x.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix, got shape {tuple(x.shape)}.")
    m, leaf_rows = x.shape[0], max(1, _leaf_rows.get() if leaf_rows is None else leaf_rows)
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


def block_lanczos(
    matmul: Callable[[Tensor], Tensor],
    start: Tensor,
    *,
    max_iter: int,
    tol: float | None = None,
) -> Tensor:
    r"""Ritz values of a symmetric operator ``u -> M u`` on a block Krylov space.

    Block Lanczos: an orthonormal basis :math:`Q` of :math:`[V, MV, M^2V, \dots]` grown one
    block at a time from ``start`` (:math:`V`), each new block fully re-orthogonalised (classical
    Gram-Schmidt twice), and the Rayleigh-Ritz values, the eigenvalues of the projection
    :math:`S = Q^T M Q` (its upper triangle, accumulated as the blocks come, mirrored). They
    tend to the extreme eigenvalues of :math:`M` at a rate set by the square root of the
    spectral gap (Golub & Van Loan, *Matrix Computations*, sec. 10.1 and 10.3). Only products
    with ``M`` are needed, so ``M`` may be implicit (a centred kernel, a Hessian-vector
    product). A block of one vector is plain Lanczos with full re-orthogonalisation.

    Stops after ``max_iter + 1`` block products, when the largest absolute Ritz value changes
    by at most ``tol`` relative between two steps (if ``tol`` is given; the Ritz values are
    then computed at every step), when the basis spans the whole space (the values are then
    exact), or when the new block adds no direction (an invariant subspace: exact values of
    the part of ``M`` that the start block reaches). Memory: the basis (one buffer, rows
    :math:`Q^T`) and the small :math:`S`; the products :math:`MQ` are not kept.

    Args:
        matmul: ``[size, b] -> [size, b]``, the product with a symmetric ``M`` (``b`` varies).
        start: ``[size, b]`` start block (orthonormalised here); its dtype and device are the
            basis'.
        max_iter: Block products after the first (``>= 0``).
        tol: Relative tolerance on the largest absolute Ritz value, or ``None``.

    Returns:
        ``[k]`` Ritz values, ascending, in ``start``'s dtype (``k`` = the basis size).

    Example:
        >>> m = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> start = torch.ones(5, 1, dtype=torch.float64)
        >>> block_lanczos(m.__matmul__, start, max_iter=4).round(decimals=6).tolist()
        [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    size, dtype = start.shape[0], start.dtype
    block = torch.linalg.qr(start).Q
    # the basis as rows (each vector contiguous: fast products for narrow blocks) in a buffer
    # sized for every step without a tolerance, else grown by doubling
    bound = min(size, block.shape[1] * (max_iter + 1))
    rows = bound if tol is None else min(bound, 8 * block.shape[1])
    qt_buf = block.new_empty(rows, size)
    qt_buf[: block.shape[1]] = block.T
    small = block.new_zeros(0, 0)  # S = Q^T M Q
    used = 0
    scale = 0.0  # max |entry| of the products so far, the scale of the rank test below
    last = torch.zeros((), dtype=dtype, device=start.device)
    ritz: Tensor | None = None
    for step in range(max_iter + 1):
        image = matmul(block)
        scale = max(scale, float(image.abs().max()))
        first, used = used, used + block.shape[1]
        qt = qt_buf[:used]
        coeffs = qt @ image  # [used, b]: the new block columns of S
        small = _extend(small, coeffs, first)
        if tol is not None:
            ritz = torch.linalg.eigvalsh(small)
            top = ritz.abs().max()
            if (top - last).abs() <= tol * top:
                break
            last = top
        if used >= size or step == max_iter:
            break
        w = image - qt.T @ coeffs
        w = w - qt.T @ (qt @ w)  # classical Gram-Schmidt twice: orthogonal to working precision
        w = w[:, : size - used]
        # an orthonormal basis of span(w) only (left singular vectors of the non-zero singular
        # values): a rank-deficient block must not bring in directions outside the Krylov space
        u, sv, _ = torch.linalg.svd(w, full_matrices=False)
        keep = sv > size * torch.finfo(dtype).eps * max(scale, 1e-300)
        if not bool(keep.any()):  # invariant subspace found: its Ritz values are exact
            break
        block = u[:, keep]
        if used + block.shape[1] > qt_buf.shape[0]:
            grown = qt_buf.new_empty(min(bound, 2 * (used + block.shape[1])), size)
            grown[:used] = qt_buf[:used]
            qt_buf = grown
        qt_buf[used : used + block.shape[1]] = block.T
        ritz = None
    return ritz if ritz is not None else torch.linalg.eigvalsh(small)


def _extend(small: Tensor, coeffs: Tensor, first: int) -> Tensor:
    """:math:`S` grown by the columns ``Q^T M q`` of a new block (rows ``first:`` its own).

    The block's diagonal part is symmetrised, the rest mirrored from the upper triangle.
    """
    used = coeffs.shape[0]
    out = coeffs.new_zeros(used, used)
    out[:first, :first] = small
    out[:first, first:] = coeffs[:first]
    out[first:, :first] = coeffs[:first].T
    diag = coeffs[first:]
    out[first:, first:] = (diag + diag.T) / 2
    return out


def top_abs_eigenvalue(
    matmul: Callable[[Tensor], Tensor],
    size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    block: int = 8,
    tol: float = 1e-7,
    max_iter: int = 300,
) -> Tensor:
    r"""Largest absolute eigenvalue of a symmetric operator ``u -> M u`` (``[size, k]`` blocks).

    :func:`block_lanczos` from ``block`` seeded random start vectors (a CPU generator seeded
    with 0, so the result is reproducible), stopped when the extreme Ritz value changes by at
    most ``tol`` relative between two steps, or when the basis spans the whole space (then
    exact). Much faster than subspace iteration for the same products.

    ``max_iter`` bounds the number of block products (the basis holds at most
    ``block * (max_iter + 1)`` vectors).

    Returns:
        A 0-d tensor in ``dtype``.
    """
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(size, min(block, size), generator=generator, dtype=dtype, device="cpu").to(
        device
    )
    return block_lanczos(matmul, v, max_iter=max_iter, tol=tol).abs().max()
