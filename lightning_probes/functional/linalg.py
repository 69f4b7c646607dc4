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

LEAF_ROWS = 128
"""Rows below which a diagonal block is one plain product (at 2x this, it is split once)."""

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
    Gram-Schmidt twice), and the Rayleigh-Ritz values, the eigenvalues of
    :math:`\tfrac12 (S + S^T)` with :math:`S = Q^T M Q`. They tend to the extreme eigenvalues
    of :math:`M` at a rate set by the square root of the spectral gap (Golub & Van Loan,
    *Matrix Computations*, sec. 10.1 and 10.3). Only products with ``M`` are needed, so ``M``
    may be implicit (a centred kernel, a Hessian-vector product). A block of one vector is
    plain Lanczos with full re-orthogonalisation.

    Stops after ``max_iter + 1`` block products, when the largest absolute Ritz value changes
    by at most ``tol`` relative between two steps (if ``tol`` is given; the Ritz values are
    then computed at every step), when the basis spans the whole space (the values are then
    exact), or when the new block adds no direction (an invariant subspace: exact values of
    the part of ``M`` that the start block reaches).

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
    # Q and M Q kept as rows (Q^T, (M Q)^T) in buffers that grow by doubling: each basis vector
    # is contiguous (fast products for narrow blocks) and no step copies the whole basis
    qt_buf, wt_buf, used = _grow(None, 0, block, size), None, 0
    scale = 0.0  # max |entry| of the images so far, the scale of the rank test below
    last = torch.zeros((), dtype=dtype, device=start.device)
    ritz: Tensor | None = None
    for step in range(max_iter + 1):
        image = matmul(block)
        wt_buf = _grow(wt_buf, used, image, size)
        used += block.shape[1]
        scale = max(scale, float(image.abs().max()))
        qt, wt = qt_buf[:used], wt_buf[:used]
        if tol is not None:
            ritz = _ritz_values(qt, wt)
            top = ritz.abs().max()
            if (top - last).abs() <= tol * top:
                break
            last = top
        if used >= size or step == max_iter:
            break
        w = image
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w = w - qt.T @ (qt @ w)
        w = w[:, : size - used]
        # an orthonormal basis of span(w) only (left singular vectors of the non-zero singular
        # values): a rank-deficient block must not bring in directions outside the Krylov space
        u, sv, _ = torch.linalg.svd(w, full_matrices=False)
        keep = sv > size * torch.finfo(dtype).eps * max(scale, 1e-300)
        if not bool(keep.any()):  # invariant subspace found: its Ritz values are exact
            break
        block = u[:, keep]
        qt_buf = _grow(qt_buf, used, block, size)
        ritz = None
    assert wt_buf is not None
    return ritz if ritz is not None else _ritz_values(qt_buf[:used], wt_buf[:used])


def _grow(buf: Tensor | None, used: int, block: Tensor, limit: int) -> Tensor:
    """``buf`` with ``block``'s columns as rows after its first ``used`` rows (grown if full).

    A full buffer is reallocated at twice the rows needed, at most ``limit`` rows.
    """
    need = used + block.shape[1]
    if buf is None or need > buf.shape[0]:
        grown = block.new_empty(max(need, min(2 * need, limit)), block.shape[0])
        if buf is not None:
            grown[:used] = buf[:used]
        buf = grown
    buf[used:need] = block.T
    return buf


def _ritz_values(qt: Tensor, wt: Tensor) -> Tensor:
    """Eigenvalues (ascending) of the symmetrised projection :math:`S = Q^T M Q`."""
    small = qt @ wt.T
    return torch.linalg.eigvalsh((small + small.T) / 2)


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
    v = torch.randn(size, min(block, size), generator=generator, dtype=dtype).to(device)
    return block_lanczos(matmul, v, max_iter=max_iter, tol=tol).abs().max()
