import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.core.isolation import isolated


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))


def test_everything_restored_after_a_meddling_scope():
    net = _net().train()
    net[3].eval()  # a mixed-mode model: each submodule's own mode must come back
    net[0].weight.requires_grad_(False)
    net(torch.randn(8, 3)).sum().backward()
    grad_obj, grad_val = net[3].weight.grad, net[3].weight.grad.clone()
    running = net[1].running_mean.clone()
    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    expected = (torch.rand(3), np.random.rand(), random.random())
    torch.manual_seed(123)
    np.random.seed(1)
    random.seed(2)
    with isolated(net):
        assert not net.training and all(p.grad is None for p in net.parameters())
        assert torch.is_grad_enabled()
        net.train()
        net[0].weight.requires_grad_(True)
        net.register_forward_hook(lambda m, a, o: o)
        net[1].register_forward_pre_hook(lambda m, a: None)
        net(torch.randn(8, 3)).sum().backward()  # updates BN stats, fills .grad, draws RNG
        torch.rand(10), np.random.rand(5), random.random()
    assert [m.training for m in net.modules()] == [True, True, True, True, False]
    assert not net[0].weight.requires_grad
    assert net[3].weight.grad is grad_obj and torch.equal(grad_obj, grad_val)
    assert net[0].weight.grad is None
    assert torch.equal(net[1].running_mean, running)
    assert not net._forward_hooks and not net[1]._forward_pre_hooks
    got = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_restores_on_exception_and_keeps_pre_existing_hooks():
    net = _net().train()
    handle = net.register_forward_hook(lambda m, a, o: o)
    with pytest.raises(ZeroDivisionError), isolated(net, grad=False):
        assert not torch.is_grad_enabled()
        net.register_forward_hook(lambda m, a, o: o)
        net.eval()
        raise ZeroDivisionError
    assert net.training and list(net._forward_hooks) == [handle.id]


def test_autocast_is_off_inside():
    net = _net()
    with torch.autocast("cpu", dtype=torch.bfloat16), isolated(net):
        assert net[0](torch.randn(2, 3)).dtype == torch.float32


def test_compiled_submodules_run_eager_inside_and_hooks_fire():
    from lightning_probes.core.hooks import capture

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    outer = nn.Sequential(torch.compile(net, backend="eager"))
    x = torch.randn(5, 3)
    expected = net(x)
    outer(x)  # compile once, so the cached graph exists
    compiled_forward = outer[0].forward
    with isolated(outer), capture({"relu": net[1]}) as rec:
        out = outer(x)
    assert rec["relu"].calls == 1 and torch.equal(rec["relu"].output, torch.relu(net[0](x)))
    assert torch.allclose(out, expected)
    assert outer[0].forward is compiled_forward


def test_buffers_rebound_in_forward_are_restored():
    """`self.calls = self.calls + 1` binds a new tensor to the buffer's name; leaving the
    isolated scope must restore the original tensor object and its value."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1
            return self.fc(x)

    net = Counting()
    original = net.calls
    with isolated(net):
        net(torch.randn(3, 2))
        net(torch.randn(3, 2))
        assert float(net.calls) == 2
    assert net.calls is original and float(net.calls) == 0
    assert dict(net.named_buffers())["calls"] is original
