"""A user's own layer type, registered through the public ``register``, is used by the probes
(kernel factors, ablation shortcut) and gives the same numbers as naive float64 references."""

from __future__ import annotations

import pytest
import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.ablation import ablation_curve
from lightning_probes.core.interventions import trace_model
from lightning_probes.core.kernels import layer_tangent_kernels, tangent_kernel_factors
from lightning_probes.core.kernels.factors import AffineFactors, JacobianFactors
from lightning_probes.core.modules import LinearOps, register, unregister


class Dense(nn.Module):
    """A linear map on the last axis that is not an ``nn.Linear`` (weight ``[out, in]``)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) / 10)

    def forward(self, x):
        return x @ self.weight.T + self.bias


@pytest.fixture
def registered():
    register(Dense, LinearOps())
    yield
    unregister(Dense)


def net(seed=0):
    torch.manual_seed(seed)
    return (
        nn.Sequential(Dense(5, 9), nn.Tanh(), Dense(9, 8), nn.ReLU(), Dense(8, 4)).double().eval()
    )


def test_unregistered_layer_takes_the_general_kernel_path():
    model, x = net(), torch.randn(6, 5, dtype=torch.float64)
    factors = tangent_kernel_factors(model, x, layers=["0", "2"])
    assert all(isinstance(f, JacobianFactors) for f in factors.values())
    assert trace_model(model, x, ["0", "2"], True).shortcut is None  # no ablation shortcut


@pytest.mark.parametrize("method", ["auto", "gram", "jacobian"])
def test_registered_layer_kernels_use_its_factors_and_match_reference(registered, method):
    model, x = net(), torch.randn(6, 5, dtype=torch.float64)
    names = ["0", "2", "4"]
    factors = tangent_kernel_factors(model, x, layers=names, method=method)
    assert all(isinstance(f, AffineFactors) for f in factors.values())
    got = layer_tangent_kernels(model, x, layers=names, method=method)
    expected = reference_kernels(model, x, names)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)


def naive_accuracy(model, x, y, points, keep):
    """Accuracy with the units ``~keep`` (over all points' features, in order) set to 0."""
    handles, start = [], 0
    for module, size in points:
        k = keep[start : start + size]
        handles.append(module.register_forward_hook(lambda m, a, o, k=k: o * k.to(o.dtype)))
        start += size
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return float((logits.argmax(-1) == y).double().mean())


@pytest.mark.parametrize("path", ["contributions", "columns"])
def test_registered_layer_is_an_ablation_shortcut_matching_a_naive_loop(registered, path):
    model = net(1)
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 4, (40,))
    trace = trace_model(model, x, ["0", "2"], True)
    assert [p.unit_dim for p in trace.points] == [-1, -1]  # LinearOps' unit axis
    assert trace.shortcut is not None and trace.shortcut[0] == "2"  # the Dense after point 1
    curve = ablation_curve(
        model, x, y, layers=["0", "2"], num_orderings=3, shortcut_path=path,
        fractions=torch.linspace(0, 1, 6), generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert curve.paths.get(path, 0) > 0
    points = [(model[1], 9), (model[3], 8)]
    for r, ordering in enumerate(curve.orderings):
        for c, count in enumerate(curve.counts.tolist()):
            keep = torch.ones(17, dtype=torch.bool)
            keep[ordering[:count]] = False
            assert float(curve.accuracy[r, c]) == pytest.approx(
                naive_accuracy(model, x, y, points, keep), abs=1e-12
            )
