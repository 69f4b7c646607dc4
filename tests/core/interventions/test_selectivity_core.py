"""Class selectivity, mutual information and single-unit ablation impact vs hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from lightning_probes.core.selectivity import (
    class_selectivity,
    unit_ablation_impact,
    unit_activity,
    unit_mutual_information,
)
from lightning_probes.functional.selectivity import (
    binned_mutual_information,
    class_conditional_means,
    selectivity_index,
    spearman_correlation,
)


def hand_net():
    """One-hot class inputs; hidden units with known class tuning."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(
            torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [3.0, 1.0, 1.0]], dtype=torch.float64)
        )
        net[0].bias.copy_(torch.tensor([0.0, -10.0, 1.0, 0.0], dtype=torch.float64))
    return net


def test_selectivity_by_hand():
    net = hand_net()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    x = nn.functional.one_hot(y, 3).double()
    si = class_selectivity(net, x, y, layers=None, num_classes=3)["0"]
    # unit 0: active for class 0 only -> 1; unit 1: dead -> 0; unit 2: constant -> 0;
    # unit 3: means (3, 1, 1) -> (3 - 1) / (3 + 1)
    assert torch.allclose(si, torch.tensor([1.0, 0.0, 0.0, 0.5], dtype=torch.float64))


def test_selectivity_conv_uses_spatial_mean_and_skips_absent_classes():
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
        .double()
        .eval()
    )
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 3, 0, 1, 3, 0, 1, 3, 0, 1, 3])  # classes 2 and 4 absent
    si = class_selectivity(net, x, y, layers="0", num_classes=5)["0"]
    act = torch.relu(net[0](x)).mean((2, 3)).detach().numpy()
    expected = []
    for j in range(3):
        means = np.array([act[y.numpy() == c, j].mean() for c in (0, 1, 3)])
        top = means.max()
        rest = (means.sum() - top) / 2
        expected.append((top - rest) / (top + rest) if top + rest > 0 else 0.0)
    assert np.allclose(si.numpy(), expected)
    acts = unit_activity(net, x, layers="0")
    assert np.allclose(acts["0"].numpy(), act)


def test_functional_selectivity_edge_cases_and_errors():
    means, present = class_conditional_means(
        torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 2]), 3
    )
    assert means[:, 0].tolist() == [2.0, 0.0, 5.0] and present.tolist() == [True, False, True]
    assert selectivity_index(torch.zeros(4, 2)).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="Expected `targets` in \\[0, 3\\), got values in"):
        class_conditional_means(torch.zeros(2, 1), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="Expected at least 2 classes present, got 1"):
        selectivity_index(torch.ones(3, 2), torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match="Expected `num_bins` to be an int >= 2, got 1"):
        binned_mutual_information(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), 2, 1)


def numpy_mi(a, y, classes, bins):
    out = []
    for j in range(a.shape[1]):
        col = a[:, j]
        if col.max() == col.min():
            out.append(0.0)
            continue
        edges = np.linspace(col.min(), col.max(), bins + 1)
        b = np.clip(np.digitize(col, edges[1:-1]), 0, bins - 1)
        joint = np.zeros((bins, classes))
        for bi, ci in zip(b, y):
            joint[bi, ci] += 1
        p = joint / len(col)
        pb, pc = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
        nz = p > 0
        out.append(float((p[nz] * np.log2(p[nz] / (pb @ pc)[nz])).sum()))
    return np.array(out)


def test_mutual_information_matches_numpy():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    a = torch.randn(300, 5, generator=g, dtype=torch.float64)
    a[:, 0] += 3 * y  # informative
    a[:, 4] = 2.0  # constant
    mi = binned_mutual_information(a, y, 4, num_bins=8)
    assert np.allclose(mi.numpy(), numpy_mi(a.numpy(), y.numpy(), 4, 8))
    assert mi[0] > 1.0 and mi[4] == 0.0 and mi[1] < 0.2
    net = hand_net()
    yy = y % 3
    x = nn.functional.one_hot(yy, 3).double()
    mi_net = unit_mutual_information(net, x, yy, layers=None, num_classes=3, num_bins=4)["0"]
    assert np.allclose(mi_net.numpy(), numpy_mi(torch.relu(net[0](x)).detach().numpy(), yy, 3, 4))


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (40,), generator=g).double()
    y = x + torch.randn(40, generator=g, dtype=torch.float64)
    assert np.isclose(float(spearman_correlation(x, y)), scipy.stats.spearmanr(x, y).statistic)
    assert torch.isnan(spearman_correlation(torch.ones(5), torch.arange(5.0)))


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_unit_ablation_impact_matches_a_loop(value):
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
        .double()
        .eval()
    )
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(50, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,))
    impact = unit_ablation_impact(net, x, y, layers=None, value=value)
    h1 = torch.relu(net[0](x)).detach()
    base = nn.functional.cross_entropy(net(x), y).item()
    for name, width in (("0", 7), ("2", 6)):
        expected = []
        for j in range(width):
            with torch.no_grad():
                a = torch.relu(net[0](x))
                if name == "0":
                    a[:, j] = 0.0 if value == "zero" else h1[:, j].mean()
                b = torch.tanh(net[2](a))
                if name == "2":
                    full = torch.tanh(net[2](h1))
                    b[:, j] = 0.0 if value == "zero" else full[:, j].mean()
                expected.append(nn.functional.cross_entropy(net[4](b), y).item() - base)
        assert np.allclose(impact[name].numpy(), expected, atol=1e-10), name


class DictNet(nn.Module):
    """Wraps a classifier so that it returns ``{"logits": ..., "features": ...}``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "features": x}


def test_dict_output_needs_output_fn_and_then_matches_the_plain_model():
    net = hand_net()
    wrapped = DictNet(net).eval()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    x = nn.functional.one_hot(y, 3).double() + 0.1
    kw = {"layers": "net.0", "num_classes": 3}
    with pytest.raises(TypeError, match="output_fn"):
        class_selectivity(wrapped, x, y, **kw)
    fn = lambda out: out["logits"]  # noqa: E731
    si = class_selectivity(wrapped, x, y, output_fn=fn, **kw)["net.0"]
    assert torch.equal(si, class_selectivity(net, x, y, layers="0", num_classes=3)["0"])
    mi = unit_mutual_information(wrapped, x, y, output_fn=fn, **kw)["net.0"]
    assert torch.equal(mi, unit_mutual_information(net, x, y, layers="0", num_classes=3)["0"])
    impact = unit_ablation_impact(wrapped, x, y, layers="net.0", output_fn=fn)["net.0"]
    assert torch.equal(impact, unit_ablation_impact(net, x, y, layers="0")["0"])
