"""The n-wedge toy landscape and flat-vector geometry (functional/landscape.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from lightning_probes.functional.landscape import (
    angle_degrees,
    cosine,
    filter_normalize,
    interpolation_barrier,
    nearest_wedge,
    wedge_distance,
    wedge_loss,
)


def brute_force_distance(point: np.ndarray, n: int) -> float:
    """Distance to every axis-aligned n-subspace by enumeration: project, measure, take min."""
    dim = len(point)
    best = math.inf
    for axes in itertools.combinations(range(dim), n):
        proj = np.zeros(dim)
        proj[list(axes)] = point[list(axes)]
        best = min(best, float(np.linalg.norm(point - proj)))
    return best


@pytest.mark.parametrize(("dim", "n"), [(5, 2), (6, 3), (4, 0), (4, 4), (7, 6)])
def test_distance_matches_enumeration_of_all_wedges(dim, n):
    rng = np.random.default_rng(dim * 10 + n)
    points = rng.normal(size=(20, dim)) * rng.uniform(0.1, 5.0, size=(20, 1))
    got = wedge_distance(torch.tensor(points), n)
    want = [brute_force_distance(p, n) for p in points]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_zero_on_every_axis_aligned_subspace():
    dim, n = 6, 3
    gen = torch.Generator().manual_seed(0)
    for axes in itertools.combinations(range(dim), n):
        p = torch.zeros(4, dim, dtype=torch.float64)
        p[:, list(axes)] = torch.randn(4, n, generator=gen, dtype=torch.float64) * 3
        assert torch.equal(wedge_distance(p, n), torch.zeros(4, dtype=torch.float64))
        assert torch.equal(wedge_loss(p, n), torch.zeros(4, dtype=torch.float64))
        assert nearest_wedge(p, n)[:, list(axes)].all()
    # off the subspace: strictly positive, equal to the size of the offset in a short axis
    p = torch.zeros(dim, dtype=torch.float64)
    p[:n] = torch.tensor([3.0, -4.0, 5.0], dtype=torch.float64)
    p[n] = 0.25
    assert float(wedge_distance(p, n)) == pytest.approx(0.25)


def test_invariant_to_permutations_and_sign_flips():
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    perm = torch.randperm(9, generator=gen)
    signs = torch.where(torch.rand(50, 9, generator=gen) < 0.5, -1.0, 1.0).double()
    for n in (0, 3, 8):
        base = wedge_distance(points, n)
        torch.testing.assert_close(wedge_distance(points[:, perm], n), base)
        torch.testing.assert_close(wedge_distance(points * signs, n), base)
        torch.testing.assert_close(
            wedge_loss(points[:, perm] * signs, n, slope=0.1, start_radius=1.0),
            wedge_loss(points, n, slope=0.1, start_radius=1.0),
        )


def test_vectorised_over_batches_equals_per_point():
    gen = torch.Generator().manual_seed(2)
    points = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 2
    batched = wedge_loss(points, 4, slope=0.05, start_radius=0.5, power=1.5)
    assert batched.shape == (3, 4)
    for i, j in itertools.product(range(3), range(4)):
        p = points[i, j].numpy()
        d = brute_force_distance(p, 4)
        width = 0.05 * max(np.linalg.norm(p) - 0.5, 0.0)
        assert float(batched[i, j]) == pytest.approx(max(d - width, 0.0) ** 1.5, rel=1e-12)
        assert float(wedge_distance(points[i, j], 4)) == pytest.approx(d, rel=1e-12)


def test_wedge_widens_with_radius_and_gradient_flows():
    # a point at a fixed angle off a wedge axis is outside near the origin, inside far out
    direction = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    assert float(wedge_loss(direction, 2, slope=0.1, start_radius=1.0)) > 0
    assert float(wedge_loss(100 * direction, 2, slope=0.1, start_radius=1.0)) == 0
    # bare model (slope 0): the squared distance scales as r^2
    assert float(wedge_loss(10 * direction, 2)) == pytest.approx(
        100 * float(wedge_loss(direction, 2))
    )
    p = torch.tensor([3.0, 0.2, -0.1, 4.0], requires_grad=True)
    wedge_loss(p, 2).backward()
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 0.4, -0.2, 0.0]))


def test_nearest_wedge_keeps_n_largest_magnitudes():
    p = torch.tensor([[0.1, -5.0, 2.0, 0.3], [1.0, 0.0, -3.0, 2.0]])
    mask = nearest_wedge(p, 2)
    assert mask.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert nearest_wedge(p, 0).sum() == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 5}, ValueError, r"Expected `n` to be an int in \[0, D=4\], got 5"),
        ({"n": -1}, ValueError, "Expected `n` to be an int in"),
        ({"n": 2, "slope": -1.0}, ValueError, "Expected `slope` to be >= 0, got -1.0"),
        ({"n": 2, "power": 0.0}, ValueError, "Expected `power` to be > 0, got 0.0"),
    ],
)
def test_wedge_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        wedge_loss(torch.ones(3, 4), **kwargs)


def test_wedge_rejects_integer_points():
    with pytest.raises(TypeError, match=r"Expected `points` to be a floating tensor \[..., D\]"):
        wedge_distance(torch.ones(3, 4, dtype=torch.long), 1)


def test_cosine_and_angle_against_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=50)
    want = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert float(cosine(torch.tensor(a).float(), torch.tensor(b).float())) == pytest.approx(
        want, rel=1e-6
    )
    assert float(angle_degrees(torch.tensor(a), torch.tensor(b))) == pytest.approx(
        np.degrees(np.arccos(want)), rel=1e-9
    )
    assert float(angle_degrees(torch.tensor(a), torch.tensor(2 * a))) == pytest.approx(0, abs=1e-5)
    assert float(cosine(torch.zeros(3), torch.ones(3))) == 0.0


def test_filter_normalize_rows_match_weight_rows():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, 2, 2, generator=gen)
    d = torch.randn(5, 3, 2, 2, generator=gen)
    out = filter_normalize(d, w)
    for j in range(5):
        assert float(out[j].norm()) == pytest.approx(float(w[j].norm()), rel=1e-5)
        # same orientation as the random direction
        assert float(cosine(out[j], d[j])) == pytest.approx(1.0, abs=1e-6)
    bias, rand = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    assert torch.equal(filter_normalize(rand, bias), torch.zeros(5))
    assert torch.equal(filter_normalize(rand, bias, one_dim="weights"), bias)
    scaled = filter_normalize(rand, bias, one_dim="norm")
    assert float(scaled.norm()) == pytest.approx(float(bias.norm()), rel=1e-5)
    with pytest.raises(ValueError, match=r"Expected `direction` shaped like `weights` \(5,\)"):
        filter_normalize(torch.ones(4), bias)
    with pytest.raises(ValueError, match="`one_dim` can be 'zero', 'weights' or 'norm', got 'x'"):
        filter_normalize(rand, bias, one_dim="x")  # type: ignore[arg-type]


def test_interpolation_barrier():
    t = torch.linspace(0, 1, 5)
    losses = torch.tensor([1.0, 2.0, 4.0, 2.5, 3.0])
    # chord at t=0.5 is 2.0, so the bump is 2.0 there (the largest gap)
    assert float(interpolation_barrier(losses, t)) == pytest.approx(2.0)
    assert float(interpolation_barrier(torch.tensor([1.0, 0.5, 1.0]), torch.linspace(0, 1, 3))) == 0
    with pytest.raises(ValueError, match="Expected `t` to run from 0 to 1"):
        interpolation_barrier(losses, torch.linspace(0, 2, 5))
    with pytest.raises(ValueError, match="Expected `losses` and `t` of the same shape"):
        interpolation_barrier(losses, torch.linspace(0, 1, 4))
