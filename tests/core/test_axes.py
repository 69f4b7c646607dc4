import pytest
import torch
from torch import nn

from lightning_probes.core.axes import find_sample_axes, roll_samples


class SeqFirst(nn.Module):
    """Batch-first inputs [n, T] of token ids; nn.TransformerEncoder in the default layout."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(20, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("T", [3, 5])  # T == n (= 3 samples) cannot be told apart by shape
@pytest.mark.parametrize("batch_first", [False, True])
def test_sample_axis_of_sequence_first_layers(T, batch_first):
    torch.manual_seed(0)
    net = SeqFirst(batch_first).eval()
    ids = torch.randint(0, 20, (6, T))
    inner = net.encoder.layers[0]
    layers = {"lin1": inner.linear1, "norm1": inner.norm1, "embed": net.embed, "head": net.head}
    axes = find_sample_axes(net, ids, layers)
    seq = 0 if batch_first else 1
    assert axes == {"lin1": seq, "norm1": seq, "embed": 0, "head": 0}


def test_unidentifiable_axes_are_none():
    torch.manual_seed(0)
    const = nn.Linear(4, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.const, self.unused = nn.Linear(4, 2), const, nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x) + self.const(torch.ones_like(x))  # const ignores the sample

    net = Net().eval()
    x = torch.randn(5, 4)
    axes = find_sample_axes(net, x, {"used": net.used, "const": net.const, "unused": net.unused})
    assert axes == {"used": 0, "const": None, "unused": None}


def test_roll_samples_of_structured_inputs():
    a, b = torch.arange(3), torch.arange(6).reshape(3, 2)
    rolled = roll_samples({"ids": a, "pair": (a, b)})
    assert torch.equal(rolled["ids"], torch.tensor([2, 0, 1]))
    assert torch.equal(rolled["pair"][1], b[[2, 0, 1]])


def test_non_finite_outputs_give_no_axis():
    """NaN outputs used to crash the comparison ("atol must be >= 0, got nan")."""
    net = nn.Linear(4, 2).eval()
    with torch.no_grad():
        net.bias.fill_(float("nan"))
    assert find_sample_axes(net, torch.randn(5, 4), {"lin": net}) == {"lin": None}
