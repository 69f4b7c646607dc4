"""HF ``Conv1D`` (weight ``[in, out]``) in the registry, known by name: each weight-layout method
against the module's own forward and naive loops (float64)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_probes.core.modules import LinearOps, TransposedLinearOps, ops_for

pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D


def conv1d(nf=4, nx=3):
    torch.manual_seed(0)
    m = Conv1D(nf, nx).double()
    with torch.no_grad():
        m.bias.normal_()
    return m


def test_conv1d_is_a_linear_layer_by_name():
    m = conv1d()
    ops = ops_for(m)
    assert isinstance(ops, TransposedLinearOps) and isinstance(ops, LinearOps)
    assert ops_for(m, exact=True) is ops and ops.default_layer and ops.unit_dim == -1
    assert ops.moves_samples(m, 1, 3) and not ops.moves_samples(m, 2, 3)


def test_weight_layout_methods_match_the_module():
    m = conv1d()
    ops = ops_for(m)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(ops.apply(m, x, m.weight, m.bias), m(x))
    # unit c of the input alone: x[..., c] * W[c, :]
    contrib = ops.unit_contributions(m, x, ())
    loops = torch.stack([x[..., c, None] * m.weight[c] for c in range(3)])
    torch.testing.assert_close(contrib, loops)
    torch.testing.assert_close(contrib.sum(0) + m.bias, m(x))
    idx = torch.tensor([2, 0])
    assert torch.equal(ops.select_outputs(m.weight, idx), m.weight[:, idx])
    assert torch.equal(ops.select_inputs(m.weight, idx), m.weight[idx])
    w = {"weight": torch.randn(3, 3, 4, dtype=torch.float64), "bias": torch.randn(3, 4).double()}
    z = torch.randn(3, 2, 5, 3, dtype=torch.float64)
    want = torch.stack([z[p] @ w["weight"][p] + w["bias"][p] for p in range(3)])
    torch.testing.assert_close(ops.per_point_forward(m, w, z), want)
    assert not ops.accepts_input(m, (3,))


def test_the_library_does_not_import_transformers():
    code = (
        "import sys, torch, lightning_probes\n"
        "from lightning_probes.core.modules import ops_for\n"
        "from lightning_probes.core.kernels import layer_tangent_kernels\n"
        "net = torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
        "layer_tangent_kernels(net, torch.randn(4, 3)); ops_for(net[0])\n"
        "assert 'transformers' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
