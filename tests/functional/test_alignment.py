"""Alignment, CKA and stable rank vs. a direct NumPy implementation; invariances; streaming;
the Hutchinson estimator's convergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.core.kernels import layer_tangent_kernels
from lightning_probes.core.kernels.estimate import estimate_layer_alignments
from lightning_probes.core.kernels.stats import layer_alignments
from lightning_probes.functional.alignment import (
    center_kernel,
    centered_kernel_alignment,
    kernel_label_alignment,
    stable_rank,
)
from lightning_probes.functional.linalg import top_abs_eigenvalue


def np_alignment(K, labels, o, centering):
    """A_l = y^T C K C y / (||C K C||_F ||y||^2) with explicit centring matrices (NumPy)."""
    n = len(labels)
    Y = np.eye(o)[labels].reshape(-1)
    if centering == "samples":
        C = np.kron(np.eye(n) - np.ones((n, n)) / n, np.eye(o))
    else:
        C = np.eye(n * o) - np.ones((n * o, n * o)) / (n * o)
    y = C @ Y
    Kc = C @ K @ C
    return y @ Kc @ y / (np.linalg.norm(Kc, "fro") * (y @ y)), Kc


def random_kernel(n=7, o=3, rank=5, seed=0):
    g = np.random.default_rng(seed)
    J = g.standard_normal((n * o, rank))
    return J @ J.T


@pytest.mark.parametrize("centering", ["samples", "full"])
def test_alignment_and_centring_match_numpy(centering):
    K = random_kernel()
    labels = np.array([0, 2, 1, 1, 0, 2, 2])
    want, Kc = np_alignment(K, labels, 3, centering)
    Kt = torch.from_numpy(K)
    got = kernel_label_alignment(Kt, torch.from_numpy(labels), 3, centering=centering)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    np.testing.assert_allclose(center_kernel(Kt, 3, centering).numpy(), Kc, rtol=1e-12, atol=1e-12)


def test_the_two_centrings_differ():
    K = random_kernel(seed=3)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    a = kernel_label_alignment(torch.from_numpy(K), labels, 3, centering="samples")
    b = kernel_label_alignment(torch.from_numpy(K), labels, 3, centering="full")
    assert abs(float(a - b)) > 1e-4


def test_invariances_range_scale_and_label_permutation():
    g = torch.Generator().manual_seed(0)
    for seed in range(5):
        K = torch.from_numpy(random_kernel(n=8, o=3, rank=seed + 1, seed=seed))
        labels = torch.randint(0, 3, (8,), generator=g)
        a = kernel_label_alignment(K, labels, 3)
        assert 0.0 <= float(a) <= 1.0 + 1e-12
        torch.testing.assert_close(kernel_label_alignment(7.5 * K, labels, 3), a)
        # permuting samples consistently in the kernel and the labels leaves A unchanged
        perm = torch.randperm(8, generator=g)
        idx = (perm[:, None] * 3 + torch.arange(3)).reshape(-1)
        torch.testing.assert_close(kernel_label_alignment(K[idx][:, idx], labels[perm], 3), a)
        # renaming classes consistently in the kernel's output axis and the labels, too
        cls = torch.tensor([2, 0, 1])
        idx = (torch.arange(8)[:, None] * 3 + cls).reshape(-1)
        inv = torch.argsort(cls)
        torch.testing.assert_close(kernel_label_alignment(K[idx][:, idx], inv[labels], 3), a)


def test_perfectly_aligned_kernel_and_cka_consistency():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    y = nn.functional.one_hot(labels, 3).double()
    yc = (y - y.mean(0)).reshape(-1)
    K = torch.outer(yc, yc) * 4.0
    torch.testing.assert_close(kernel_label_alignment(K, labels, 3), torch.tensor(1.0).double())
    K = torch.from_numpy(random_kernel(n=6))
    yy = torch.outer(y.reshape(-1), y.reshape(-1))
    torch.testing.assert_close(
        centered_kernel_alignment(K, yy, num_outputs=3, centering="samples"),
        kernel_label_alignment(K, labels, 3),
    )
    torch.testing.assert_close(
        centered_kernel_alignment(K, yy), kernel_label_alignment(K, labels, 3, centering="full")
    )


def test_centered_kernel_alignment_matches_numpy_and_is_symmetric():
    K1, K2 = random_kernel(seed=1), random_kernel(seed=2)
    N = K1.shape[0]
    C = np.eye(N) - np.ones((N, N)) / N
    A, B = C @ K1 @ C, C @ K2 @ C
    want = np.trace(A @ B) / (np.linalg.norm(A) * np.linalg.norm(B))
    got = centered_kernel_alignment(torch.from_numpy(K1), torch.from_numpy(K2))
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    np.testing.assert_allclose(
        float(centered_kernel_alignment(torch.from_numpy(K2), torch.from_numpy(K1))),
        want,
        rtol=1e-12,
    )


@pytest.mark.parametrize("exact_below", [2048, 4])
def test_stable_rank_matches_numpy(exact_below):
    K = random_kernel(n=10, o=3, rank=6, seed=4)
    Kc = center_kernel(torch.from_numpy(K), 3).numpy()
    want = np.linalg.norm(Kc, "fro") ** 2 / np.linalg.norm(Kc, 2) ** 2
    got = stable_rank(torch.from_numpy(Kc), exact_below=exact_below, tol=1e-12)
    np.testing.assert_allclose(float(got), want, rtol=1e-8)
    assert 1.0 <= float(got) <= 6.0


def test_functional_errors():
    K = torch.eye(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="`centering` can be samples, full, got 'none'"):
        kernel_label_alignment(K, torch.tensor([0, 1, 0]), 2, centering="none")
    with pytest.raises(ValueError, match="Expected `targets` to have 3 rows"):
        kernel_label_alignment(K, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="class indices in \\[0, 2\\), got values in \\[0, 5\\]"):
        kernel_label_alignment(K, torch.tensor([0, 1, 5]), 2)
    with pytest.raises(ValueError, match="multiple of the 4 outputs, got 6"):
        kernel_label_alignment(K, torch.tensor([0, 1, 0]), 4)
    with pytest.raises(ValueError, match="Expected `kernel` to be a square 2-D tensor"):
        kernel_label_alignment(K[:3], torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match="Expected `k1` and `k2` of the same shape"):
        centered_kernel_alignment(K, torch.eye(4))


def net_and_data(seed=0, n=13):
    torch.manual_seed(seed)
    net = (
        nn.Sequential(
            nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)
        )
        .double()
        .eval()
    )
    return net, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("centering", ["samples", "full"])
@pytest.mark.parametrize(
    ("n", "chunk_size"),
    # n=13 (n·o=39): the last layer (21 parameters) from its per-sample gradients, the others
    # from the kernel; n=40: every layer from its gradients; chunked: every layer streamed
    [(13, None), (40, None), (13, 4)],
)
def test_streamed_statistics_equal_the_full_kernel_formulas(centering, n, chunk_size):
    net, x, y = net_and_data(n=n)
    kernels = layer_tangent_kernels(net, x)
    stats = layer_alignments(net, x, y, centering=centering, chunk_size=chunk_size)
    for name, K in kernels.items():
        want, Kc = np_alignment(K.numpy(), y.numpy(), 3, centering)
        s = stats[name]
        np.testing.assert_allclose(float(s.alignment), want, rtol=1e-9)
        np.testing.assert_allclose(float(s.frobenius), np.linalg.norm(Kc), rtol=1e-9)
        np.testing.assert_allclose(float(s.trace), np.trace(K.numpy()), rtol=1e-12)
        sr = np.linalg.norm(Kc) ** 2 / np.linalg.norm(Kc, 2) ** 2
        np.testing.assert_allclose(float(s.stable_rank), sr, rtol=1e-6)


def test_label_energy_is_the_squared_gradient_norm():
    net, x, y = net_and_data()
    stats = layer_alignments(net, x, y)
    yc = nn.functional.one_hot(y, 3).double()
    yc = yc - yc.mean(0)
    grads = torch.autograd.grad((net(x) * yc).sum(), [net[0].weight, net[0].bias])
    energy = sum(g.square().sum() for g in grads)
    torch.testing.assert_close(stats["0"].label_energy, energy, rtol=1e-10, atol=0)


def test_hutchinson_frobenius_is_unbiased_and_converges():
    net, x, y = net_and_data(seed=1, n=10)
    exact = layer_alignments(net, x, y)
    errors = {}
    for m in (8, 256):
        est = estimate_layer_alignments(
            net, x, y, num_probes=m, generator=torch.Generator().manual_seed(m)
        )
        errors[m] = []
        for name, e in est.items():
            f = float(exact[name].frobenius)
            rel = abs(float(e.frobenius) - f) / f
            errors[m].append(rel)
            # within 4 standard errors, and the documented bound sqrt(2/m)/2 * 4
            assert abs(float(e.frobenius) - f) <= 4 * float(e.std_error) + 1e-12, (m, name)
            assert rel <= 4 * np.sqrt(2 / m) / 2
            torch.testing.assert_close(e.label_energy, exact[name].label_energy, rtol=1e-10, atol=0)
    assert np.mean(errors[256]) < np.mean(errors[8])
    with pytest.raises(ValueError, match="Expected `num_probes` to be an int >= 2, got 1"):
        estimate_layer_alignments(net, x, y, num_probes=1)


@pytest.mark.parametrize(
    ("spectrum", "block"),
    [
        (np.r_[-5.0, np.linspace(4.9, 0.0, 299)], 8),  # top |λ| is negative, tiny gap
        (np.r_[3.0, 2.0, 1.0, np.zeros(197)], 8),  # rank 3 < block: invariant subspace
        (np.linspace(1.0, 0.5, 40), 64),  # block larger than the matrix
    ],
)
def test_top_abs_eigenvalue_matches_eigvalsh(spectrum, block):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((spectrum.size, spectrum.size)))
    m = torch.from_numpy((q * spectrum) @ q.T)
    got = top_abs_eigenvalue(
        m.__matmul__, m.shape[0], dtype=m.dtype, device=m.device, block=block, tol=1e-13
    )
    want = np.abs(np.linalg.eigvalsh(m.numpy())).max()
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
