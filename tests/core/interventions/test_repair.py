"""Per-sample arguments repeated after the first point (``core/interventions/repair.py``).

A module called after the point receives the residual (per-sample, computed before the point)
and a fixed table whose first axis happens to equal the number of samples. Only the residual
may be repeated with the batch: found by running 2 and 3 samples, not by its size at run time.
Checked against a float64 loop that ablates one unit at a time by hand.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_probes.core.interventions.repair import per_sample_arguments
from lightning_probes.core.interventions.selectivity import unit_ablation_impact

T = 6  # positions; the probe set also has 6 samples


class Out(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, table: torch.Tensor):
        return self.fc(h) + residual + table  # table [T, 4] broadcasts over samples


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.out = nn.Linear(4, 8), nn.ReLU(), Out()
        self.register_buffer("table", torch.randn(T, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [n, T, 4]
        y = self.out(self.act(self.fc1(x)), x, self.table)
        return self.head(y.mean(1))


def test_only_per_sample_arguments_are_found():
    torch.manual_seed(0)
    net = Net().double().eval()
    found = per_sample_arguments(net, torch.randn(T, T, 4, dtype=torch.float64))
    assert found["out"] == (frozenset({0, 1}), frozenset())  # h and the residual, not the table


def test_unit_impact_with_a_residual_argument_equals_a_loop():
    torch.manual_seed(0)
    net = Net().double().eval()
    x = torch.randn(T, T, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (T,))
    with warnings.catch_warnings():  # the residual is repeated: no block or input fallback
        warnings.filterwarnings("error", message=".*mixes activations")
        got = unit_ablation_impact(net, x, y, layers="fc1")["fc1"]

    def loss(unit: int | None) -> torch.Tensor:
        def hook(module, args, out):
            out = out.clone()
            if unit is not None:
                out[..., unit] = 0.0
            return out

        handle = net.act.register_forward_hook(hook)
        with torch.no_grad():
            value = nn.functional.cross_entropy(net(x), y)
        handle.remove()
        return value

    want = torch.stack([loss(j) - loss(None) for j in range(8)])
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_scripted_module_takes_no_hooks_and_is_left_out():
    """TorchScript modules refuse hooks: the search registers none on them and does not raise."""
    torch.manual_seed(0)
    net = Net().double().eval()
    net.out.fc = torch.jit.script(net.out.fc)
    found = per_sample_arguments(net, torch.randn(T, T, 4, dtype=torch.float64))
    assert "out.fc" not in found and found["out"] == (frozenset({0, 1}), frozenset())
