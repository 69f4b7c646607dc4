"""Blockwise Gram matrix X X^T vs. dot products computed one by one (float64)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.kernels import layer_tangent_kernels
from lightning_probes.functional.linalg import self_gram


def dot_products(x: torch.Tensor) -> torch.Tensor:
    """Naive reference: every entry as its own dot product."""
    m = x.shape[0]
    out = torch.empty(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            out[i, j] = (x[i].double() * x[j].double()).sum()
    return out


@pytest.mark.parametrize(
    ("rows", "cols", "leaf"), [(7, 5, 1), (9, 3, 2), (41, 6, 3), (64, 4, 16), (5, 8, 128)]
)
def test_self_gram_matches_dot_products(rows, cols, leaf):
    x = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(rows))
    got = self_gram(x, leaf_rows=leaf)
    torch.testing.assert_close(got, dot_products(x), rtol=1e-12, atol=1e-12)
    h = rows // 2
    if rows >= 2 * leaf:  # split: the lower off-diagonal block is a copy of the upper one
        assert torch.equal(got[h:, :h], got[:h, h:].T)


def test_self_gram_of_a_transposed_view_is_x_transpose_x():
    x = torch.randn(6, 50, dtype=torch.float64)
    got = self_gram(x.T, leaf_rows=4)  # [50, 6] view with swapped strides
    torch.testing.assert_close(got, dot_products(x.T.contiguous()), rtol=1e-12, atol=1e-12)


def test_self_gram_float32_and_default_leaf():
    x = torch.randn(600, 30)
    torch.testing.assert_close(self_gram(x), (x.double() @ x.double().T).float())


def test_self_gram_keeps_autograd_when_input_requires_grad():
    x = torch.randn(300, 4, dtype=torch.float64, requires_grad=True)
    self_gram(x, leaf_rows=8).sum().backward()
    # d/dx sum(x x^T) = 2 * (column sums broadcast): (1 1^T) x + (1 1^T)^T x
    want = 2 * x.detach().sum(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(x.grad, want)


def test_self_gram_empty_and_bad_input():
    assert self_gram(torch.empty(0, 3)).shape == (0, 0)
    with pytest.raises(ValueError, match="2-D"):
        self_gram(torch.randn(3))


@pytest.mark.parametrize("method", ["jacobian", "gram"])
def test_kernels_with_split_diagonal_blocks_match_reference(method):
    """n·o = 300 rows: the diagonal kernel block goes through the blockwise Gram."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 10)
    ).double()
    x = torch.randn(30, 2, 5, 5, dtype=torch.float64)
    names = ["0", "3"] if method == "jacobian" else ["3"]
    got = layer_tangent_kernels(model, x, layers=names, method=method)
    want = reference_kernels(model, x, names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)


def test_gram_leaf_rows_chooses_the_plain_product_in_scope():
    import sys

    from lightning_probes.functional.linalg import LEAF_ROWS, gram_leaf_rows

    x = torch.randn(600, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    blockwise = self_gram(x)
    with gram_leaf_rows(sys.maxsize):
        assert torch.equal(self_gram(x), x @ x.T)
        assert torch.equal(self_gram(x, leaf_rows=LEAF_ROWS), blockwise)  # explicit wins
    assert torch.equal(self_gram(x), blockwise)
    with (
        pytest.raises(ValueError, match="Expected `rows` to be a positive int, got 0"),
        gram_leaf_rows(0),
    ):
        pass


@pytest.mark.parametrize("block", [1, 3, 8])
def test_block_lanczos_ritz_values_against_eigvalsh(block):
    from lightning_probes.functional.linalg import block_lanczos

    gen = torch.Generator().manual_seed(block)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-9.0, 7.0, 6.0]), torch.rand(47, generator=gen) - 0.5])
    a = (q * spectrum.double()) @ q.T
    start = torch.randn(50, block, generator=gen, dtype=torch.float64)
    # the whole space: every eigenvalue, exactly
    ritz = block_lanczos(a.__matmul__, start, max_iter=50)
    torch.testing.assert_close(ritz, torch.linalg.eigvalsh(a), rtol=1e-10, atol=1e-10)
    # a tolerance: the extreme eigenvalue converges first
    ritz = block_lanczos(a.__matmul__, start, max_iter=50, tol=1e-12)
    assert ritz.numel() < 50
    torch.testing.assert_close(ritz.abs().max(), torch.tensor(9.0, dtype=torch.float64))
    # a rank-2 operator: an invariant subspace stops the iteration early
    low = (q[:, :2] * torch.tensor([3.0, 1.0], dtype=torch.float64)) @ q[:, :2].T
    ritz = block_lanczos(low.__matmul__, start[:, :1], max_iter=20)
    assert ritz.numel() == 3
    torch.testing.assert_close(ritz[-2:], torch.tensor([1.0, 3.0], dtype=torch.float64))
