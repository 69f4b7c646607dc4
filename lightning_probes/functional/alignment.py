r"""Kernel-label alignment, centred kernel alignment and stable rank of tangent kernels.

Pure tensor math for the layer-alignment diagnostic of Baratin et al. (2021), "Implicit
Regularization via Neural Feature Alignment", used by Lou et al. (ICML 2022), "Feature Learning
and Signal Propagation in Deep Neural Networks" (the "alignment hierarchy").

Index convention (stated once): a kernel over ``n`` samples and ``o`` outputs is an
``(n·o, n·o)`` matrix whose row ``i·o + c`` belongs to sample ``i``, output ``c``; viewed as a
4-tensor it is ``K[i, c, j, d]``. Two centrings are offered, both a projector :math:`C`
applied by :func:`center` (labels :math:`C y`, Jacobians :math:`C J`) and, on both sides of a
kernel, by :func:`center_kernel` (:math:`C K C`):

- ``"samples"`` (the authors' code, the default): centre over samples separately for every pair
  of outputs, :math:`K_c = (H_n \otimes I_o) K (H_n \otimes I_o)`, :math:`H_n = I - 11^T/n`;
  one-hot targets are centred over samples.
- ``"full"`` (the paper's eq. (6)): :math:`K_c = C K C`, :math:`C = I - 11^T/(on)`; targets are
  centred over all ``n·o`` entries.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_probes.functional.linalg import top_abs_eigenvalue

Centering = Literal["samples", "full"]
_CENTERINGS = ("samples", "full")


def _check_kernel(kernel: Tensor, name: str = "kernel") -> None:
    if not isinstance(kernel, Tensor) or kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(
            f"Expected `{name}` to be a square 2-D tensor (n·o, n·o), got "
            f"{getattr(kernel, 'shape', type(kernel).__name__)}."
        )


def _check_centering(centering: str) -> None:
    if centering not in _CENTERINGS:
        raise ValueError(f"`centering` can be {', '.join(_CENTERINGS)}, got {centering!r}.")


def center(x: Tensor, centering: Centering = "samples", *, dim: int = 0) -> Tensor:
    r"""Apply the centring projector :math:`C` to ``x`` along its sample and output axes.

    .. math::
        C = H_n \otimes I_o,\; H_n = I - \tfrac1n 11^T \quad (\text{samples}), \qquad
        C = I - \tfrac{1}{on} 11^T \quad (\text{full}):

    subtract each output's mean over the samples, or the mean over all samples and outputs. The
    one centring behind :func:`centered_labels` (:math:`C y`), the centred Jacobians and
    implicit :math:`K_c u = C K C u` of :mod:`lightning_probes.core.kernels`; a kernel's two
    sides at once: :func:`center_kernel`.

    Args:
        x: ``[..., n, o, ...]`` with samples on axis ``dim`` and outputs on ``dim + 1`` (a
            ``[n·o, k]`` block in the kernel's row order is ``x.view(n, o, k)``).
        centering: ``"samples"`` (authors' code) or ``"full"`` (paper eq. (6)).
        dim: Axis of the samples; the outputs follow it.

    Returns:
        :math:`C x`, same shape and dtype.

    Raises:
        ValueError: For an unknown ``centering`` or no output axis after ``dim``.

    Example:
        >>> y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
        >>> center(y)[0].tolist(), center(y, "full").sum().item()
        ([0.5, -0.5], 0.0)
    """
    _check_centering(centering)
    axis = dim % x.ndim if x.ndim else dim
    if not 0 <= axis < x.ndim - 1:
        raise ValueError(
            f"Expected `x` to have samples on axis `dim` and outputs on `dim + 1`, got "
            f"dim={dim} for shape {tuple(x.shape)}."
        )
    if centering == "samples":
        return x - x.mean(dim, keepdim=True)
    return x - x.mean((axis, axis + 1), keepdim=True)


def center_kernel(kernel: Tensor, num_outputs: int, centering: Centering = "samples") -> Tensor:
    r"""Centre a tangent kernel over samples per output pair, or over all entries.

    Both sides of :func:`center` at once (one pass, same rounding as before the split).

    .. math::
        K_c = (H_n \otimes I_o)\,K\,(H_n \otimes I_o) \quad (\text{samples}), \qquad
        K_c = C K C,\; C = I - \tfrac{1}{on} 11^T \quad (\text{full}).

    Args:
        kernel: ``(n·o, n·o)``, row index ``i·o + c``.
        num_outputs: ``o``.
        centering: ``"samples"`` (authors' code) or ``"full"`` (paper eq. (6)).

    Returns:
        The centred kernel, same shape and dtype.

    Raises:
        ValueError: If the kernel is not square or its size is not a multiple of ``o``.

    Example:
        >>> k = torch.eye(4, dtype=torch.float64)
        >>> center_kernel(k, 2).sum(0)
        tensor([0., 0., 0., 0.], dtype=torch.float64)
    """
    _check_kernel(kernel)
    _check_centering(centering)
    if centering == "full":
        return kernel - kernel.mean(0, keepdim=True) - kernel.mean(1, keepdim=True) + kernel.mean()
    n = _num_samples(kernel, num_outputs)
    k4 = kernel.reshape(n, num_outputs, n, num_outputs)
    k4 = k4 - k4.mean(0, keepdim=True) - k4.mean(2, keepdim=True) + k4.mean((0, 2), keepdim=True)
    return k4.reshape(kernel.shape)


def centered_labels(
    targets: Tensor,
    num_classes: int,
    centering: Centering = "samples",
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""One-hot targets, centred, flattened to the kernel's row order (length ``n·o``).

    Args:
        targets: ``[n]`` integer class indices, or ``[n, o]`` float targets (used as given).
        num_classes: ``o``.
        centering: ``"samples"``: subtract the per-class mean over samples; ``"full"``:
            subtract the mean of all ``n·o`` entries (:math:`\tilde Y = (I - 11^T/(on)) Y`).
        dtype: Floating dtype of the result (default: float64 for integer targets).

    Returns:
        ``[n·o]``, entry ``i·o + c``.
    """
    _check_centering(centering)
    if targets.ndim == 1 and not torch.is_floating_point(targets):
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"Expected `targets` to be class indices in [0, {num_classes}), got values in "
                f"[{int(targets.min())}, {int(targets.max())}]."
            )
        y = torch.nn.functional.one_hot(targets.long(), num_classes).to(dtype or torch.float64)
    elif targets.ndim == 2 and targets.shape[1] == num_classes:
        y = targets.to(dtype or (targets.dtype if targets.is_floating_point() else torch.float64))
    else:
        raise ValueError(
            f"Expected `targets` to be [n] class indices or [n, {num_classes}] floats, got "
            f"shape {tuple(targets.shape)} ({targets.dtype})."
        )
    return center(y, centering).reshape(-1)


def kernel_label_alignment(
    kernel: Tensor,
    targets: Tensor,
    num_classes: int,
    *,
    centering: Centering = "samples",
) -> Tensor:
    r"""Alignment :math:`A_l` of a layer's tangent kernel with the labels.

    .. math::
        A = \frac{\tilde y^T K_c \tilde y}{\|K_c\|_F \, \|\tilde y\|^2} \in [0, 1]

    (Lou et al. 2022, eq. (7); Baratin et al. 2021), with :math:`\tilde y` the centred one-hot
    labels and :math:`K_c` the centred kernel (see :func:`center_kernel`). Equal to
    :func:`centered_kernel_alignment` of ``kernel`` and :math:`yy^T`. Invariant to scaling ``K``.

    Args:
        kernel: ``(n·o, n·o)`` positive semi-definite, row index ``i·o + c``.
        targets: ``[n]`` class indices or ``[n, o]`` float targets.
        num_classes: ``o``.
        centering: ``"samples"`` (authors' code, default) or ``"full"`` (paper eq. (6)).

    Returns:
        A 0-d tensor in the kernel's dtype (NaN if the centred kernel or labels vanish).

    Raises:
        ValueError: For inconsistent shapes or an unknown ``centering``.

    Example:
        >>> y = torch.tensor([0, 1, 0, 1])
        >>> yc = centered_labels(y, 2)
        >>> float(kernel_label_alignment(torch.outer(yc, yc), y, 2))
        1.0
    """
    _check_kernel(kernel)
    n = _num_samples(kernel, num_classes)
    if targets.shape[0] != n:
        raise ValueError(
            f"Expected `targets` to have {n} rows (kernel of size {kernel.shape[0]} with "
            f"{num_classes} outputs), got {targets.shape[0]}."
        )
    y = centered_labels(targets, num_classes, centering, dtype=kernel.dtype)
    kc = center_kernel(kernel, num_classes, centering)
    return (y @ kc @ y) / (torch.linalg.matrix_norm(kc) * (y @ y))


def centered_kernel_alignment(
    k1: Tensor,
    k2: Tensor,
    *,
    num_outputs: int | None = None,
    centering: Centering = "full",
) -> Tensor:
    r"""Centred kernel alignment of two kernel matrices (Lou et al. 2022, eq. (6)).

    .. math::
        A(K, K') = \frac{\operatorname{Tr}[K_c K'_c]}{\|K_c\|_F \, \|K'_c\|_F}

    Args:
        k1: ``(N, N)`` kernel.
        k2: ``(N, N)`` kernel.
        num_outputs: ``o`` for ``centering="samples"`` (``N = n·o``); ignored for ``"full"``.
        centering: ``"full"`` (paper eq. (6), default) or ``"samples"`` (per output pair).

    Returns:
        A 0-d tensor; in [0, 1] for positive semi-definite kernels.

    Example:
        >>> k = torch.randn(6, 3, dtype=torch.float64)
        >>> k = k @ k.T
        >>> round(float(centered_kernel_alignment(k, 2.5 * k)), 6)
        1.0
    """
    _check_kernel(k1, "k1")
    _check_kernel(k2, "k2")
    if k1.shape != k2.shape:
        raise ValueError(f"Expected `k1` and `k2` of the same shape, got {k1.shape}, {k2.shape}.")
    o = 1 if centering == "full" else num_outputs
    if o is None:
        raise ValueError("Expected `num_outputs` (an int) with `centering='samples'`, got None.")
    c1, c2 = center_kernel(k1, o, centering), center_kernel(k2, o, centering)
    return (c1 * c2).sum() / (torch.linalg.matrix_norm(c1) * torch.linalg.matrix_norm(c2))


def stable_rank(matrix: Tensor, *, exact_below: int = 128, tol: float = 1e-7) -> Tensor:
    r"""Stable rank :math:`R = \|M\|_F^2 / \|M\|_2^2` of a symmetric matrix (Lou et al., App. G.1).

    The spectral norm comes from ``eigvalsh`` for ``N <= exact_below``; above, from block
    Lanczos (:func:`~lightning_probes.functional.linalg.top_abs_eigenvalue`: 8 seeded start
    vectors, relative tolerance ``tol`` on the top eigenvalue), which needs only products.

    Args:
        matrix: ``(N, N)`` symmetric (e.g. a centred kernel :math:`K_c`).
        exact_below: Size up to which the full spectrum is computed.
        tol: Relative convergence tolerance of the block Lanczos iteration.

    Returns:
        A 0-d tensor in ``[1, rank(M)]`` (NaN for the zero matrix).

    Example:
        >>> round(float(stable_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0])))), 6)
        1.5
    """
    _check_kernel(matrix, "matrix")
    top = spectral_norm_symmetric(matrix, exact_below=exact_below, tol=tol)
    return torch.linalg.matrix_norm(matrix) ** 2 / top**2


def spectral_norm_symmetric(
    matrix: Tensor, *, exact_below: int = 128, tol: float = 1e-7, max_iter: int = 300
) -> Tensor:
    """Largest absolute eigenvalue of a symmetric matrix (see :func:`stable_rank`)."""
    n = matrix.shape[0]
    if n <= exact_below:
        return torch.linalg.eigvalsh(matrix).abs().max()
    return top_abs_eigenvalue(
        matrix.__matmul__, n, dtype=matrix.dtype, device=matrix.device, tol=tol, max_iter=max_iter
    )


def _num_samples(kernel: Tensor, num_outputs: int) -> int:
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"Expected `num_outputs` to be a positive int, got {num_outputs!r}.")
    size = kernel.shape[0]
    if size % num_outputs:
        raise ValueError(
            f"Expected the kernel size to be a multiple of the {num_outputs} outputs, got {size}."
        )
    return size // num_outputs
