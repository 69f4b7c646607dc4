"""HF ``Conv1D`` (weight ``[in, out]``) and HF activations in the registry: registered lazily,
each weight-layout method against the module's own forward, and the ablation shortcuts on an
MLP of ``Conv1D`` layers against forward hooks (issue 14, item 1)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_probes.core.interventions.ablation import ablation_curve
from lightning_probes.core.modules import TransposedLinearOps, ops_for

transformers = pytest.importorskip("transformers")
from transformers.activations import (  # noqa: E402
    FastGELUActivation,
    GELUActivation,
    NewGELUActivation,
    QuickGELUActivation,
    ReLUSquaredActivation,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402


def test_library_import_does_not_import_transformers():
    code = "import sys, lightning_probes; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_hf_types_are_registered_lazily():
    assert isinstance(ops_for(Conv1D(4, 3)), TransposedLinearOps)
    for act in (GELUActivation(), NewGELUActivation(), FastGELUActivation(), QuickGELUActivation()):
        ops = ops_for(act)
        assert ops is not None and ops.activation and not ops.non_negative
    assert ops_for(ReLUSquaredActivation()).non_negative
    assert ops_for(nn.ReLU()).non_negative and not ops_for(nn.GELU()).non_negative


def test_transposed_weight_methods_match_the_module():
    torch.manual_seed(0)
    layer = Conv1D(5, 7).double()  # nf=5 outputs, nx=7 inputs: weight [7, 5]
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    ops = TransposedLinearOps()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(ops.apply(layer, x, layer.weight, layer.bias), layer(x))
    parts = ops.unit_contributions(layer, x, ())
    assert parts.shape == (7, 3, 4, 5)
    torch.testing.assert_close(parts.sum(0) + layer.bias, layer(x))
    idx = torch.tensor([0, 3])
    w_in = ops.select_inputs(layer.weight, idx)
    torch.testing.assert_close(ops.apply(layer, x[..., idx], w_in, None), x[..., idx] @ w_in)
    w_out = ops.select_outputs(layer.weight, idx)
    torch.testing.assert_close(ops.apply(layer, x, w_out, None), (x @ layer.weight)[..., idx])
    w = {"weight": torch.stack([layer.weight, 2 * layer.weight]), "bias": layer.bias.expand(2, 5)}
    z = torch.stack([x, x])
    got = ops.per_point_forward(layer, w, z)
    torch.testing.assert_close(got[0], layer(x))
    torch.testing.assert_close(got[1], x @ (2 * layer.weight) + layer.bias)
    assert not ops.accepts_input(layer, (7,))


def test_conv1d_mlp_ablation_shortcuts_match_hooks():
    """The shortcut (contributions/columns) and sparse paths run on Conv1D layers."""
    torch.manual_seed(1)
    net = nn.Sequential(
        Conv1D(12, 6), nn.ReLU(), Conv1D(10, 12), nn.ReLU(), Conv1D(8, 10), nn.ReLU(),
        Conv1D(3, 8),
    ).double().eval()  # fmt: skip
    for m in net:
        if isinstance(m, Conv1D):
            nn.init.normal_(m.weight, std=0.5)
            nn.init.normal_(m.bias, std=0.1)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    for path in ("contributions", "columns"):
        curve = ablation_curve(net, x, y, layers=["0", "2", "4"], num_orderings=3,
                               fractions=torch.linspace(0, 1, 6), shortcut_path=path)  # fmt: skip
        assert curve.paths.get(path, 0) > 0 and curve.paths.get("sparse", 0) > 0
        for r, order in enumerate(curve.orderings):
            for k, count in enumerate(curve.counts.tolist()):
                keep = torch.ones(30, dtype=torch.bool)
                keep[order[:count]] = False
                h = x
                for i, kk in zip((0, 2, 4), keep.split([12, 10, 8])):
                    h = torch.relu(net[i](h)) * kk
                acc = float((net[6](h).argmax(1) == y).double().mean())
                assert float(curve.accuracy[r, k]) == pytest.approx(acc, abs=1e-12)


def test_conv1d_kernel_factors_match_the_func_reference():
    """The entry's kernel factors (layout-free) give the float64 per-sample-Jacobian kernel."""
    from reference import reference_kernels

    from lightning_probes.core.kernels import layer_tangent_kernels, tangent_kernel_factors
    from lightning_probes.core.kernels.factors import AffineFactors

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(6, 4), Conv1D(3, 6)

        def forward(self, x):  # [n, T, 4] -> [n, 3]
            return self.b(torch.tanh(self.a(x))).mean(1)

    torch.manual_seed(2)
    model = Seq().double().eval()
    for p in model.parameters():
        nn.init.normal_(p)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    factors = tangent_kernel_factors(model, x, layers=["a", "b"])
    assert all(isinstance(f, AffineFactors) for f in factors.values())
    got, want = (
        layer_tangent_kernels(model, x, layers=["a", "b"]),
        reference_kernels(model, x, ["a", "b"]),
    )
    for name in ("a", "b"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
