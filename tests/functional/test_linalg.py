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
