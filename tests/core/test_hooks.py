import pytest
import torch
from torch import nn

from lightning_probes.core.hooks import capture, count_calls, replace_output


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_capture_inputs_and_outputs_then_removed():
    net = _net()
    x = torch.randn(5, 3)
    with capture({"0": net[0], "2": net[2]}, inputs=True) as rec:
        out = net(x)
    assert torch.equal(rec["0"].input, x)
    assert torch.equal(rec["0"].output, x @ net[0].weight.T + net[0].bias)
    assert torch.equal(rec["2"].input, torch.relu(rec["0"].output))
    assert torch.equal(rec["2"].output, out)
    assert not rec["0"].output.requires_grad
    assert all(not m._forward_hooks for m in net.modules())


def test_capture_keeps_graph_when_asked():
    net = _net()
    with capture({"0": net[0]}, detach=False) as rec:
        net(torch.randn(2, 3))
    assert rec["0"].output.requires_grad


def test_capture_single_call_accessor_rejects_double_calls():
    net = _net()
    with capture({"0": net[0]}) as rec:
        net(torch.randn(2, 3))
        net(torch.randn(2, 3))
    assert rec["0"].calls == 2
    with pytest.raises(RuntimeError, match="exactly once per forward, got 2 calls"):
        _ = rec["0"].output


def test_replace_output_and_removal_even_on_error():
    net = _net()
    x = torch.randn(4, 3)
    with replace_output({"1": net[1]}, lambda name, out: torch.zeros_like(out)):
        y = net(x)
    assert torch.allclose(y, net[2].bias.expand(4, 2))
    with pytest.raises(KeyError), replace_output({"1": net[1]}, lambda n, o: o):
        raise KeyError("x")
    assert all(not m._forward_hooks for m in net.modules())
    assert not torch.allclose(net(x), y)


def test_capture_rejects_non_tensor_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    m = Pair()
    with (
        pytest.raises(TypeError, match="Expected layer 'p' to return a Tensor, got tuple"),
        capture({"p": m}),
    ):
        m(torch.zeros(1))


def test_count_calls_detects_weight_sharing():
    lin = nn.Linear(3, 3)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    assert count_calls(shared, {"0": lin}, torch.randn(2, 3)) == {"0": 2}
    assert not lin._forward_pre_hooks


def test_detached_records_survive_later_inplace_ops():
    """nn.ReLU(inplace=True) after the layer overwrites its output storage; the record must
    still hold the pre-activation values (negative entries included), and a residual
    ``x += ...`` must not change a recorded input."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.act(self.fc(x))
            h += x  # in place on the ReLU's output
            return h

    torch.manual_seed(0)
    net = Residual()
    x = torch.randn(8, 3)
    with torch.no_grad():
        pre = x @ net.fc.weight.T + net.fc.bias
    with torch.no_grad(), capture({"fc": net.fc, "act": net.act}, inputs=True) as rec:
        net(x.clone())
    assert (pre < 0).any()
    assert torch.equal(rec["fc"].output, pre)
    assert torch.equal(rec["act"].input, pre)
    assert torch.equal(rec["act"].output, torch.relu(pre))
