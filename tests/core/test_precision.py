"""core.precision: narrow weights are probed in float32 and left exactly as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.isolation import isolated
from lightning_probes.core.lca import loss_change_allocation
from lightning_probes.core.precision import (
    cast_inputs,
    computation_dtype,
    trained_parameters,
    widened,
)


class Tied(nn.Module):
    """bf16 Linear + BatchNorm, a weight shared by two modules, one float32 parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.norm = nn.BatchNorm1d(4)
        self.to(torch.bfloat16)
        self.scale = nn.Parameter(torch.ones(4))  # float32 already: left alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x))) * self.scale


def state(model: nn.Module):
    """Every parameter and buffer: the object, its data pointer, dtype and a copy."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return {k: (v, v.data_ptr(), v.dtype, v.detach().clone()) for k, v in tensors}


def assert_unchanged(model, before):
    after = state(model)
    assert after.keys() == before.keys()
    for k, (obj, ptr, dtype, copy) in before.items():
        assert after[k][0] is obj and after[k][1] == ptr and after[k][2] == dtype, k
        assert torch.equal(after[k][3], copy), k


def test_widened_computes_in_float32_on_the_same_values_and_restores_everything():
    model = Tied().train()
    model.norm(torch.randn(8, 4).bfloat16())  # non-trivial running statistics
    before = state(model)
    x = torch.randn(3, 4)
    with widened(model):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert model.norm.running_mean.dtype == torch.float32
        assert model.b.weight is model.a.weight  # tied weights stay tied
        for k, p in model.named_parameters():
            assert torch.equal(p, before[k][3].float()), k  # the weights exactly
        trained = trained_parameters(model)
        assert trained["a.weight"].dtype == torch.bfloat16
        assert trained["a.weight"].data_ptr() == before["a.weight"][1]
        assert trained["scale"].dtype == torch.float32
        out = model.eval()(x)  # float32 inputs meet float32 weights
        assert out.dtype == torch.float32
        model.norm.running_mean.add_(1.0)  # writes land on the copy
    assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="inside"), widened(model):
        raise RuntimeError("inside")
    assert_unchanged(model, before)
    assert trained_parameters(model)["a.weight"] is not None  # outside: the parameters


def test_isolated_widens_and_keeps_the_training_grads():
    model = Tied()
    model(torch.randn(3, 4).bfloat16()).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    before = state(model)
    with isolated(model):
        loss = model(torch.randn(3, 4)).sum()
        loss.backward()  # a probe's backward: float32 gradients, not the training's
        assert model.a.weight.grad.dtype == torch.float32
    assert_unchanged(model, before)
    for k, p in model.named_parameters():
        assert p.grad is grads[k], k
    with isolated(model, widen=False):
        assert model.a.weight.dtype == torch.bfloat16


def test_computation_dtype_and_cast_inputs():
    assert computation_dtype(nn.Linear(2, 2).half()) == torch.float32
    assert computation_dtype(nn.Linear(2, 2).double()) == torch.float64
    assert computation_dtype(nn.Linear(2, 2)) == torch.float32
    assert computation_dtype(nn.Module()) == torch.float32
    x = torch.ones(2, dtype=torch.bfloat16)
    ids = torch.arange(2)
    out = cast_inputs({"x": x, "pair": (ids, x.double())}, torch.float32)
    assert out["x"].dtype == torch.float32 and out["pair"][0] is ids
    assert out["pair"][1].dtype == torch.float32
    same = torch.ones(2)
    assert cast_inputs(same, torch.float32) is same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lca_of_narrow_weights_integrates_in_float32(dtype):
    """A quadratic loss: Simpson is exact, so LC_i = a_i (x1_i^2 - x0_i^2) of the narrow values."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    x0 = torch.randn(64, generator=g).to(dtype)
    x1 = (x0.float() - 0.01 * torch.randn(64, generator=g)).to(dtype)
    seen = set()

    def loss(p):
        seen.add(p["x"].dtype)
        return (a * p["x"].double() ** 2).sum()

    res = loss_change_allocation(loss, {"x": x0}, {"x": x1}, method="simpson", splits=2)
    assert seen == {torch.float32}  # the end points and the midpoint, unrounded
    exact = a * (x1.double() ** 2 - x0.double() ** 2)
    torch.testing.assert_close(res.lc["x"].double(), exact, rtol=1e-5, atol=1e-7)
    assert res.true_delta == pytest.approx(float(exact.sum()), rel=1e-12)
    assert res.error < 1e-6


def test_gradient_accumulators_and_their_hooks_survive_the_probe():
    """What DDP relies on: its hooks sit on each parameter's AccumulateGrad node."""
    model = Tied()
    p = model.a.weight
    accumulator = p.view_as(p).grad_fn.next_functions[0][0]
    fired = []
    accumulator.register_hook(lambda *args: fired.append(1))
    with isolated(model):
        model(torch.randn(3, 4)).sum().backward()  # the probe's backward: on the copies
    assert fired == []
    assert p.view_as(p).grad_fn.next_functions[0][0] is accumulator
    model(torch.randn(3, 4).bfloat16()).sum().backward()  # training's backward
    assert fired == [1] and p.grad.dtype == torch.bfloat16
