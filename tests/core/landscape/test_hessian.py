"""Hessian-vector products and Lanczos top eigenvalues against the full Hessian in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.landscape.hessian import (
    count_short_directions,
    hessian_top_eigenvalues,
    hessian_vector_product,
    lanczos_top_eigenvalues,
)


def tiny_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    gen = torch.Generator().manual_seed(1)
    data = ProbeSet(
        torch.randn(30, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (30,), generator=gen),
    )
    return net, data


def full_hessian(net: nn.Module, data: ProbeSet) -> torch.Tensor:
    """Dense Hessian of the mean cross-entropy by ``torch.func.hessian`` on the flat vector."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(vec: torch.Tensor) -> torch.Tensor:
        parts = torch.split(vec, sizes)
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        out = functional_call(net, params, (data.inputs,))
        return nn.functional.cross_entropy(out, data.targets)

    return hessian(loss)(flat)


def test_hvp_matches_dense_hessian_with_chunks():
    net, data = tiny_problem()
    dense = full_hessian(net, data)
    params = {n: p.detach() for n, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(2)
    vec = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in params.items()}
    flat_v = torch.cat([v.reshape(-1) for v in vec.values()])
    for chunk in (None, 7):
        hv = hessian_vector_product(net, data, params, vec, chunk_size=chunk)
        torch.testing.assert_close(torch.cat([h.reshape(-1) for h in hv.values()]), dense @ flat_v)


def test_lanczos_top_eigenvalues_match_eigvalsh_of_full_hessian():
    net, data = tiny_problem()
    exact = torch.linalg.eigvalsh(full_hessian(net, data)).flip(0)
    dim = exact.numel()  # 43 parameters
    # a full Krylov space reproduces the spectrum exactly
    full = hessian_top_eigenvalues(
        net, data, k=5, num_iters=dim, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(full, exact[:5], rtol=1e-8, atol=1e-10)
    # fewer iterations: the extreme (top) eigenvalues converge first
    part = hessian_top_eigenvalues(
        net, data, k=3, num_iters=25, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(part, exact[:3], rtol=1e-6, atol=1e-8)


def test_lanczos_on_known_spectrum_and_invariant_subspace():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    spectrum = torch.cat(
        [
            torch.tensor([50.0, 20.0, 10.0, 5.0]),
            torch.rand(56, generator=gen, dtype=torch.float64) * 0.1,
        ]
    )
    a = q @ torch.diag(spectrum) @ q.T
    top = lanczos_top_eigenvalues(lambda v: a @ v, 60, 4, num_iters=30, generator=gen)
    torch.testing.assert_close(top, torch.tensor([50.0, 20.0, 10.0, 5.0], dtype=torch.float64))
    assert count_short_directions(top, 7.0) == 3
    # rank-2 operator: the Krylov space is exhausted after 2-3 steps and Lanczos stops early
    low = q[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q[:, :2].T
    top = lanczos_top_eigenvalues(lambda v: low @ v, 60, 2, generator=gen)
    torch.testing.assert_close(top, torch.tensor([3.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("k", "iters", "match"),
    [
        (0, None, r"Expected `k` to be an int in \[1, 10\], got 0"),
        (3, 2, r"Expected `num_iters` to be an int in \[k=3, dim=10\], got 2"),
    ],
)
def test_lanczos_errors(k, iters, match):
    with pytest.raises(ValueError, match=match):
        lanczos_top_eigenvalues(lambda v: v, 10, k, num_iters=iters)
