"""functional.nad: PCA against scikit-learn, NAD-basis utilities against naive loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from lightning_probes.functional.nad import (
    directional_dataset,
    nad_coefficients,
    nad_energy,
    nad_flip,
    nad_reconstruct,
    principal_axes,
)


def _orthonormal_basis(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q.T


def _low_rank_samples(m: int = 120, d: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    return (torch.randn(m, d, generator=g, dtype=torch.float64) * scales) @ _orthonormal_basis(
        d, seed + 1
    ) + 3.0


def test_principal_axes_match_sklearn_pca():
    a = _low_rank_samples()
    pca = PCA(n_components=10, svd_solver="full").fit(a.numpy())
    axes = principal_axes(a, k=10)
    np.testing.assert_allclose(axes.singular_values.numpy(), pca.singular_values_, rtol=1e-10)
    np.testing.assert_allclose(axes.explained_variance.numpy(), pca.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(
        axes.explained_variance_ratio.numpy(), pca.explained_variance_ratio_, rtol=1e-10
    )
    # same axes up to sign; our sign: largest-magnitude entry positive
    cos = (axes.directions.numpy() * pca.components_).sum(1)
    np.testing.assert_allclose(np.abs(cos), 1.0, atol=1e-10)
    rows = np.arange(10)
    assert (axes.directions[rows, axes.directions.abs().argmax(1)] > 0).all()


def test_principal_axes_centre_the_samples():
    a = _low_rank_samples()
    shifted = principal_axes(a + 100.0)
    plain = principal_axes(a)
    torch.testing.assert_close(shifted.singular_values, plain.singular_values)


def test_lowrank_matches_full_on_a_decaying_spectrum_and_leaves_global_rng():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(300, 8, generator=g, dtype=torch.float64)).Q.T
    a = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -1, 8)
    a = (a @ basis + 1e-4 * torch.randn(200, 300, generator=g, dtype=torch.float64)).float()
    full = principal_axes(a, k=5, svd="full")
    state = torch.get_rng_state()
    low = principal_axes(a, k=5, svd="lowrank", seed=3)
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(
        low.singular_values.double(), full.singular_values, rtol=1e-4, atol=0
    )
    cos = (low.directions.double() * full.directions).sum(1)
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        low.explained_variance_ratio.double(), full.explained_variance_ratio, rtol=1e-4, atol=0
    )


@pytest.mark.parametrize(
    ("samples", "kwargs", "match"),
    [
        (torch.zeros(1, 3), {}, r"Expected `samples` to be a 2-D \(m, d\) tensor with m >= 2"),
        (torch.zeros(4), {}, "Expected `samples` to be a 2-D"),
        (torch.zeros(4, 3), {"k": 4}, r"Expected `k` to be an int in \[1, min\(m, d\) = 3\]"),
        (torch.zeros(4, 3), {"svd": "exact"}, "`svd` can be 'auto', 'full' or 'lowrank'"),
    ],
)
def test_principal_axes_errors(samples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        principal_axes(samples, **kwargs)


def test_projection_round_trip_and_energy_against_loops():
    u = _orthonormal_basis(12).reshape(12, 3, 2, 2)
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    c = nad_coefficients(x, u)
    naive = torch.tensor([[float((x[n] * u[i]).sum()) for i in range(12)] for n in range(7)])
    torch.testing.assert_close(c, naive.double())
    torch.testing.assert_close(nad_reconstruct(c, u), x)
    energy, total = nad_energy(x, u)
    torch.testing.assert_close(energy, (naive.double() ** 2).mean(0))
    torch.testing.assert_close(energy.sum(), total)  # complete basis: Parseval


def test_flip_reverses_coefficients_and_is_an_involutive_isometry():
    u = _orthonormal_basis(10)
    x = torch.randn(5, 10, dtype=torch.float64)
    flipped = nad_flip(x, u)
    c = nad_coefficients(x, u)
    for i in range(10):
        torch.testing.assert_close(nad_coefficients(flipped, u)[:, 9 - i], c[:, i])
    torch.testing.assert_close(flipped.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(nad_flip(flipped, u), x)


def test_flip_with_a_truncated_basis_keeps_the_rest():
    u = _orthonormal_basis(10)[:4]
    x = torch.randn(3, 10, dtype=torch.float64)
    flipped = nad_flip(x, u)
    rest = x - nad_reconstruct(nad_coefficients(x, u), u)
    torch.testing.assert_close(flipped - nad_reconstruct(nad_coefficients(flipped, u), u), rest)
    torch.testing.assert_close(nad_coefficients(flipped, u), nad_coefficients(x, u).flip(1))
    torch.testing.assert_close(nad_flip(flipped, u), x)


def test_directional_dataset_margin_noise_and_labels():
    v = torch.zeros(1, 8, 8, dtype=torch.float64)
    v[0, 2, 3], v[0, 5, 1] = 3.0, -4.0  # norm 5: normalised inside
    x, y = directional_dataset(v, 4001, sigma=3.0, epsilon=1.0, generator=torch.Generator())
    assert x.shape == (4001, 1, 8, 8) and y.dtype == torch.int64
    assert int((y == 0).sum()) == 2001 and bool((y[:2001] == 0).all())
    unit = (v / 5.0).reshape(-1)
    along = x.reshape(4001, -1) @ unit
    torch.testing.assert_close(along, torch.where(y == 0, 0.5, -0.5).double())
    orth = x.reshape(4001, -1) - along[:, None] * unit
    # P_perp(sigma n): variance sigma^2 on each of the d - 1 orthogonal dimensions
    per_dim = orth.square().sum(1).mean() / 63
    assert abs(float(per_dim) - 9.0) < 0.15


def test_directional_dataset_errors():
    with pytest.raises(ValueError, match="Expected `v` to be a non-zero direction"):
        directional_dataset(torch.zeros(4), 10)
    with pytest.raises(ValueError, match="Expected `num_samples` to be a positive int, got 0"):
        directional_dataset(torch.ones(4), 0)
