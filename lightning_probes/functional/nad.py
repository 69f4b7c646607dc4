r"""Neural Anisotropy Directions: the tensor math (PCA of gradients, NAD-basis utilities).

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. The NADs of an architecture are the principal axes of the input gradients of
many randomly initialised copies of it; this module holds the parts that are plain tensor
math: the mean-centred PCA (:func:`principal_axes`), and the tools that use a NAD basis —
coefficients and energy of data per NAD index (:func:`nad_coefficients`,
:func:`nad_energy`), the authors' linearly separable dataset :math:`D(v)`
(:func:`directional_dataset`) and the "flip" transform (:func:`nad_flip`).

Index letters: ``m`` networks, ``n`` samples, ``k`` directions, ``d`` input dimensions
(``d = prod(input_shape)``). A basis ``directions`` has shape ``(k, *input_shape)`` with
orthonormal rows once flattened to ``(k, d)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SVDMethod = Literal["auto", "full", "lowrank"]
_OVERSAMPLE = 10
_ROWS_PER_BLOCK = 64  # rows per float64 block when summing squares


@dataclass
class PrincipalAxes:
    """Result of :func:`principal_axes`.

    Attributes:
        directions: ``(k, d)`` orthonormal principal axes, by decreasing singular value.
        singular_values: ``(k,)`` singular values of the mean-centred ``(m, d)`` matrix.
        explained_variance: ``(k,)`` ``singular_values**2 / (m - 1)`` (as scikit-learn).
        explained_variance_ratio: ``(k,)`` share of the total variance of each axis.
    """

    directions: Tensor
    singular_values: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor


def principal_axes(
    samples: Tensor, k: int | None = None, *, svd: SVDMethod = "auto", seed: int = 0
) -> PrincipalAxes:
    r"""Mean-centred PCA of ``samples`` (rows are observations), as the NAD authors do it.

    With :math:`A_c = A - \mathbf{1}\bar a^\top` the centred ``(m, d)`` matrix and
    :math:`A_c = U \Sigma V^\top` its SVD, the principal axes are the rows of :math:`V^\top`
    and

    .. math:: \lambda_i = \frac{\sigma_i^2}{m - 1}, \qquad
        r_i = \frac{\sigma_i^2}{\lVert A_c \rVert_F^2}.

    The sign of each axis is fixed so that its largest-magnitude entry is positive
    (scikit-learn's ``svd_flip`` convention on :math:`V^\top`), making results reproducible.

    Args:
        samples: ``(m, d)`` observations (the networks' gradient vectors), ``m >= 2``.
        k: Number of axes to keep, at most ``min(m, d)``; ``None`` keeps ``min(m, d)``.
        svd: ``"full"``: exact SVD in float64. ``"lowrank"``: randomized SVD
            (Halko et al., ``k + 10`` columns, 4 power iterations) in the samples'
            dtype, without materialising the centred matrix — for large ``d``, small
            ``k``. ``"auto"``: low-rank when ``k`` is given, ``d > 4096`` and
            ``k + 10 <= min(m, d) // 2``; otherwise full.
        seed: Seed of the randomized SVD's sketch (the global RNG is left untouched).

    Returns:
        The :class:`PrincipalAxes` (float64 for ``"full"``, the input dtype for ``"lowrank"``).

    Raises:
        ValueError: If ``samples`` is not 2-D with at least two rows, or ``k`` is out of range.

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [0.0, -0.1]])
        >>> axes = principal_axes(a, k=1)
        >>> axes.directions, axes.explained_variance_ratio
        (tensor([[1., 0.]], dtype=torch.float64), tensor([0.9901], dtype=torch.float64))
    """
    if samples.ndim != 2 or samples.shape[0] < 2:
        raise ValueError(
            f"Expected `samples` to be a 2-D (m, d) tensor with m >= 2, got {tuple(samples.shape)}."
        )
    m, d = samples.shape
    rank = min(m, d)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= rank):
        raise ValueError(f"Expected `k` to be an int in [1, min(m, d) = {rank}], got {k!r}.")
    if svd not in ("auto", "full", "lowrank"):
        raise ValueError(f"`svd` can be 'auto', 'full' or 'lowrank', got {svd!r}.")
    keep = rank if k is None else k
    if svd == "auto":
        svd = (
            "lowrank" if k is not None and d > 4096 and keep + _OVERSAMPLE <= rank // 2 else "full"
        )
    mean = samples.mean(0, keepdim=True)
    if svd == "full":
        centred = samples.double() - mean.double()
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        total = centred.square().sum()
    else:
        generator = torch.Generator(samples.device).manual_seed(seed)
        s, vh = _randomized_svd(samples, mean, min(keep + _OVERSAMPLE, rank), 4, generator)
        # in float64, row block by row block: no full-size float64 copy of a large matrix
        squares = sum(
            (block.double().square().sum() for block in samples.split(_ROWS_PER_BLOCK)),
            torch.zeros((), dtype=torch.float64, device=samples.device),
        )
        total = (squares - m * mean.double().square().sum()).to(s.dtype)
    s, vh = s[:keep], vh[:keep]
    pivot = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, pivot))
    vh = vh * torch.where(sign == 0, torch.ones_like(sign), sign)
    variance = s.square() / (m - 1)
    ratio = s.square() / total if float(total) > 0 else torch.zeros_like(s)
    return PrincipalAxes(vh.contiguous(), s, variance, ratio)


def _randomized_svd(
    a: Tensor, mean: Tensor, q: int, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Top-``q`` singular values and right vectors of ``a - 1 mean^T``.

    Halko, Martinsson, Tropp (2011), Alg. 4.4 (power iterations with QR
    re-orthonormalisation), never forming the centred matrix.
    """

    def apply(x: Tensor) -> Tensor:  # (a - 1 mean^T) x
        return a @ x - mean @ x

    def apply_t(y: Tensor) -> Tensor:  # (a - 1 mean^T)^T y
        return a.T @ y - mean.T @ y.sum(0, keepdim=True)

    omega = torch.randn(a.shape[1], q, generator=generator, dtype=a.dtype, device=a.device)
    basis = torch.linalg.qr(apply(omega)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(apply(torch.linalg.qr(apply_t(basis)).Q)).Q
    _, s, vh = torch.linalg.svd(apply_t(basis).T, full_matrices=False)
    return s, vh


def nad_coefficients(x: Tensor, directions: Tensor) -> Tensor:
    r"""Coordinates of samples in a NAD basis: :math:`c_{ni} = \langle u_i, x_n \rangle`.

    Args:
        x: ``(n, *input_shape)`` samples.
        directions: ``(k, *input_shape)`` orthonormal NADs.

    Returns:
        ``(n, k)`` coefficients, in the common dtype of ``x`` and ``directions``.
    """
    u = directions.reshape(directions.shape[0], -1)
    dtype = torch.promote_types(x.dtype, u.dtype)
    return x.reshape(x.shape[0], -1).to(dtype) @ u.to(dtype).T


def nad_reconstruct(coefficients: Tensor, directions: Tensor) -> Tensor:
    r"""Samples from NAD coordinates: :math:`x_n = \sum_i c_{ni} u_i`.

    The inverse of :func:`nad_coefficients` on the span of the basis.

    Args:
        coefficients: ``(n, k)``.
        directions: ``(k, *input_shape)`` orthonormal NADs.

    Returns:
        ``(n, *input_shape)``.
    """
    u = directions.reshape(directions.shape[0], -1).to(coefficients.dtype)
    return (coefficients @ u).reshape(coefficients.shape[0], *directions.shape[1:])


def nad_energy(x: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    r"""Energy of data per NAD index: :math:`e_i = \frac{1}{n}\sum_n \langle u_i, x_n\rangle^2`.

    The data are not centred (the first NAD of a CNN is close to the constant image, so the
    mean brightness is part of what the network sees). With a complete basis
    :math:`\sum_i e_i` equals the total energy :math:`\frac{1}{n}\sum_n \lVert x_n\rVert^2`;
    with a truncated one the rest lies outside the kept NADs.

    Args:
        x: ``(n, *input_shape)`` samples (data, or input gradients).
        directions: ``(k, *input_shape)`` orthonormal NADs.

    Returns:
        ``(energy (k,), total ())`` in float64.
    """
    c = nad_coefficients(x.double(), directions.double())
    return c.square().mean(0), x.double().reshape(x.shape[0], -1).square().sum(1).mean()


def directional_dataset(
    v: Tensor,
    num_samples: int,
    *,
    sigma: float = 3.0,
    epsilon: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The authors' linearly separable dataset :math:`D(v)` along a direction ``v``.

    .. math:: x = \pm\frac{\varepsilon}{2} v + P_{v^\perp}(\sigma n),
        \qquad n \sim \mathcal N(0, I),

    where :math:`v` is normalised to unit norm. The first ``ceil(num_samples / 2)`` samples
    take the ``+`` sign and label 0, the rest the ``-`` sign and label 1 (as in the authors'
    ``DirectionalLinearDataset``). A linear classifier along ``v`` separates it with margin
    :math:`\varepsilon`; everything orthogonal to ``v`` is noise of std :math:`\sigma`.

    Args:
        v: ``(*input_shape)`` direction (e.g. a NAD), not necessarily unit-norm.
        num_samples: Number of samples ``n``.
        sigma: Noise std :math:`\sigma` (paper: 3).
        epsilon: Margin :math:`\varepsilon` (paper: 1).
        generator: Source of the noise (default: the global RNG).

    Returns:
        ``(x (n, *input_shape), y (n,) int64)``.

    Raises:
        ValueError: If ``v`` is zero or ``num_samples < 1``.
    """
    if num_samples < 1:
        raise ValueError(f"Expected `num_samples` to be a positive int, got {num_samples}.")
    norm = v.norm()
    if float(norm) == 0.0:
        raise ValueError("Expected `v` to be a non-zero direction, got a zero tensor.")
    u = (v / norm).reshape(-1)
    noise = sigma * torch.randn(
        num_samples, u.numel(), generator=generator, dtype=v.dtype, device=v.device
    )
    noise = noise - (noise @ u)[:, None] * u[None]
    n_plus = num_samples - num_samples // 2
    sign = torch.ones(num_samples, dtype=v.dtype, device=v.device)
    sign[n_plus:] = -1.0
    x = sign[:, None] * (epsilon / 2) * u[None] + noise
    y = (sign < 0).long()
    return x.reshape(num_samples, *v.shape), y


def nad_flip(x: Tensor, directions: Tensor) -> Tensor:
    r"""The authors' "flip": reverse every sample's coordinates in the NAD basis.

    .. math:: x \mapsto U\,\mathrm{flip}(U^\top x) + (I - U U^\top) x

    so the coefficient on NAD :math:`i` moves to NAD :math:`k - 1 - i`; the part of
    :math:`x` outside the span of the ``k`` NADs is kept (nothing, for a complete basis).
    An involution (applying it twice gives ``x`` back) and an isometry, so it loses no
    information — a network that learns worse on flipped data does so because of its bias.

    Args:
        x: ``(n, *input_shape)`` samples.
        directions: ``(k, *input_shape)`` orthonormal NADs.

    Returns:
        ``(n, *input_shape)`` flipped samples.
    """
    c = nad_coefficients(x, directions)
    rest = x.reshape(x.shape[0], -1).to(c.dtype) - nad_reconstruct(c, directions).reshape(
        x.shape[0], -1
    )
    return nad_reconstruct(c.flip(1), directions) + rest.reshape(x.shape)
