"""Ablation curves and noise curves against naive per-mask loops (Morcos et al., 2018)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_probes.core.ablation import (
    ablation_curve,
    ablation_points,
    default_ablation_layers,
    noise_curve,
)
from lightning_probes.core.interventions import trace_model
from lightning_probes.functional.ablation import (
    ablation_counts,
    cumulative_keep_masks,
    curve_area,
)


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    ).to(dtype)
    return net.eval()


class CNN(nn.Module):
    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        c = 6
        self.features = nn.Sequential(
            nn.Conv2d(2, c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, stride=2), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        h = self.features[:2](x)
        out = self.features[2:](h)
        if self.residual:  # skip connection from before the first ablation point
            out = out + nn.functional.avg_pool2d(h, 2)
        return self.head(out.mean((2, 3)))


def cnn(residual=False, dtype=torch.float64):
    torch.manual_seed(1)
    net = CNN(residual).to(dtype)
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def data(n=40, shape=(6,), classes=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,))


def naive_curve(net, x, y, modules, unit_dims, orderings, counts, values=None):
    """One full forward per (ordering, count), masks set by plain forward hooks."""
    sizes = []
    with torch.no_grad():
        outs = {}
        handles = [
            m.register_forward_hook(lambda mod, a, o, k=k: outs.__setitem__(k, o))
            for k, m in enumerate(modules)
        ]
        net(x)
        for h in handles:
            h.remove()
        sizes = [outs[k].shape[unit_dims[k]] for k in range(len(modules))]
    offsets = np.cumsum([0, *sizes])
    acc = torch.zeros(len(orderings), len(counts), dtype=torch.float64)
    for r, order in enumerate(orderings):
        for k, m in enumerate(counts):
            ablated = set(order[: int(m)].tolist())
            handles = []
            for j, module in enumerate(modules):
                units = [i - offsets[j] for i in ablated if offsets[j] <= i < offsets[j + 1]]

                def hook(mod, a, o, units=units, j=j):
                    o = o.clone()
                    idx = [slice(None)] * o.ndim
                    idx[unit_dims[j]] = units
                    o[tuple(idx)] = 0.0 if values is None else values[j][tuple(idx[1:])]
                    return o

                handles.append(module.register_forward_hook(hook))
            with torch.no_grad():
                pred = net(x).argmax(-1)
            for h in handles:
                h.remove()
            acc[r, k] = (pred == y).double().mean()
    return acc


def test_mlp_curve_equals_manual_forward_loop_exactly():
    net = mlp()
    x, y = data()
    curve = ablation_curve(
        net, x, y, layers=None, num_orderings=3, generator=torch.Generator().manual_seed(3)
    )
    assert curve.num_units == {"0": 12, "2": 10}
    # independent reference: the network written out by hand, masks multiplied in
    acc = torch.zeros(3, 21, dtype=torch.float64)
    for r, order in enumerate(curve.orderings):
        for k, m in enumerate(curve.counts):
            keep = torch.ones(22, dtype=torch.float64)
            keep[order[: int(m)]] = 0.0
            h1 = torch.relu(net[0](x)) * keep[:12]
            h2 = torch.relu(net[2](h1)) * keep[12:]
            acc[r, k] = (net[4](h2).argmax(-1) == y).double().mean()
    assert torch.equal(curve.accuracy, acc)
    assert torch.equal(curve.counts, torch.round(torch.linspace(0, 1, 21).double() * 22).long())
    mean = acc.mean(0).numpy()
    assert torch.allclose(curve.mean, torch.from_numpy(mean))
    assert np.isclose(float(curve.std[5]), np.std(acc[:, 5].numpy(), ddof=1))
    x_axis = curve.counts.double().numpy() / 22
    assert np.isclose(float(curve.auc), np.trapezoid(mean, x_axis))
    assert np.isclose(float(curve.normalized_auc), np.trapezoid(mean, x_axis) / mean[0])
    assert float(curve.accuracy[0, 0]) == float((net(x).argmax(-1) == y).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", ["zero", "mean"])
def test_cnn_curve_equals_naive_hook_loop(dtype, value):
    net = cnn(dtype=dtype)
    x, y = data(24, (2, 8, 8), classes=5, dtype=dtype)
    trace = trace_model(net, x, None, True)
    assert [p.layer for p in trace.points] == ["features.2", "features.5", "features.8"]
    assert [p.name for p in trace.points] == ["features.4", "features.7", "features.9"]
    assert trace.shortcut is not None and trace.shortcut[0] == "features.5"
    curve = ablation_curve(
        net, x, y, layers=None, num_orderings=2, value=value, fractions=torch.linspace(0, 1, 7),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    modules = [net.features[4], net.features[7], net.features[9]]
    values = None
    if value == "mean":  # each element's mean over the probe set, by hand
        values = []
        with torch.no_grad():
            h = x
            for i, layer in enumerate(net.features):
                h = layer(h)
                if i in (4, 7, 9):
                    values.append(h.double().mean(0).to(dtype))
    expected = naive_curve(net, x, y, modules, [1, 1, 1], curve.orderings, curve.counts, values)
    assert torch.equal(curve.accuracy, expected)


def test_skip_connection_around_first_point_falls_back_and_stays_exact():
    net = cnn(residual=True)
    x, y = data(16, (2, 8, 8), classes=5)
    with pytest.warns(UserWarning, match="repeating the inputs instead"):
        curve = ablation_curve(
            net, x, y, layers=None, num_orderings=2, fractions=torch.linspace(0, 1, 6),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    modules = [net.features[4], net.features[7], net.features[9]]
    expected = naive_curve(net, x, y, modules, [1, 1, 1], curve.orderings, curve.counts)
    assert torch.equal(curve.accuracy, expected)


def test_chunking_to_a_tiny_memory_budget_changes_nothing():
    net = mlp(torch.float32)
    x, y = data(30, dtype=torch.float32)
    kwargs = dict(layers=None, num_orderings=3, value="mean")
    a = ablation_curve(net, x, y, generator=torch.Generator().manual_seed(1), **kwargs)
    b = ablation_curve(
        net, x, y, generator=torch.Generator().manual_seed(1), memory_budget=600, **kwargs
    )
    assert torch.equal(a.accuracy, b.accuracy)


def test_units_that_cannot_change_the_output_leave_the_curve_flat():
    net = mlp()
    with torch.no_grad():
        net[2].weight.zero_()  # layer 2's units ignore layer 1 ...
        net[2].bias.copy_(torch.linspace(0.1, 1, 10))
        net[4].weight[:, 5:] = 0.0  # ... and half of them do not reach the output
    x, y = data()
    curve = ablation_curve(net, x, y, layers="0", num_orderings=3)
    base = float((net(x).argmax(-1) == y).double().mean())
    assert torch.all(curve.accuracy == base)
    assert np.isclose(float(curve.auc), base) and np.isclose(float(curve.normalized_auc), 1.0)
    # ablating every unit of layer 2 leaves constant logits: accuracy = share of that class
    curve2 = ablation_curve(net, x, y, layers="2", num_orderings=2)
    pred = int(net[4].bias.argmax())
    assert float(curve2.mean[-1]) == float((y == pred).double().mean())


def test_auc_bounds_and_monotone_in_all_ablated():
    net = mlp(seed=4)
    x, y = data(64)
    curve = ablation_curve(net, x, y, layers=None, num_orderings=5)
    assert 0.0 <= float(curve.auc) <= 1.0
    assert float(curve.auc) <= float(curve.mean.max())
    assert float(curve.auc) >= float(curve.mean.min())
    assert torch.all(curve.std >= 0) and curve.std[0] == 0 and curve.std[-1] == 0


def test_explicit_points_and_activation_following():
    net = cnn()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    pts = ablation_points(net, x, ["features.2", "features.8"])
    assert pts["features.2"].name == "features.4"  # Conv -> BatchNorm -> ReLU
    assert pts["features.8"].name == "features.9"
    raw = ablation_points(net, x, ["features.2"], follow_activation=False)
    assert raw["features.2"].name == "features.2" and raw["features.2"].num_units == 6
    relu = ablation_points(net, x, ["features.4"])  # naming the activation itself
    assert relu["features.4"].name == "features.4" and relu["features.4"].unit_dim == 1

    class Functional(nn.Module):  # activation applied functionally: no module to follow
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    f = Functional()
    assert ablation_points(f, torch.randn(2, 3), None)["fc1"].name == "fc1"
    assert default_ablation_layers(mlp()) == ["0", "2"]
    assert default_ablation_layers(cnn()) == ["features.2", "features.5", "features.8"]


def test_errors():
    net = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="Layer 'nope' not found"):
        ablation_curve(net, x, y, layers="nope")
    with pytest.raises(ValueError, match="`value` can be 'zero' or 'mean', got 'one'"):
        ablation_curve(net, x, y, layers=None, value="one")
    with pytest.raises(ValueError, match="Expected `fractions` to run from 0 to 1"):
        ablation_curve(net, x, y, layers=None, fractions=torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="non-decreasing values in \\[0, 1\\]"):
        ablation_curve(net, x, y, layers=None, fractions=torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="Expected `num_orderings` to be a positive int"):
        ablation_curve(net, x, y, layers=None, num_orderings=0)
    with pytest.raises(ValueError, match="Expected `targets` to be \\[n\\] class indices"):
        ablation_curve(net, x, y.double(), layers=None)
    with pytest.raises(ValueError, match="at least two Linear layers"):
        ablation_curve(nn.Sequential(nn.Linear(6, 3)).double().eval(), x, y, layers=None)
    shared = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    twice = nn.Sequential(shared, shared, nn.Linear(6, 3)).double().eval()
    with pytest.raises(ValueError, match="run exactly once per forward pass, got 2 calls"):
        ablation_curve(twice, x, y, layers="0.0")
    with pytest.raises(ValueError, match="resolve to distinct intervention points"):
        ablation_curve(net, x, y, layers=["0", "1"])
    net.train()
    with pytest.warns(UserWarning, match="is in training mode"):
        ablation_curve(net, x, y, layers=None, num_orderings=1)


def test_noise_curve_zero_scale_is_clean_and_noise_has_the_unit_std():
    net = mlp(torch.float32)
    x, y = data(200, dtype=torch.float32)
    clean = float((net(x).argmax(-1) == y).double().mean())
    curve = noise_curve(
        net, x, y, layers=None, scales=torch.tensor([0.0, 1e3]), num_repeats=3,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.all(curve.accuracy[:, 0] == clean)
    assert curve.accuracy.shape == (3, 2) and float(curve.mean[1]) < clean
    # the perturbation seen by the next layer has std = scale * the unit's std
    seen = []
    handle = net[2].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        noise_curve(net, x, y, layers="0", scales=torch.tensor([0.5]), num_repeats=1)
    finally:
        handle.remove()
    clean_h = torch.relu(net[0](x)).detach()
    noise = seen[-1] - clean_h
    ratio = noise.std(0) / clean_h.std(0, correction=0)
    alive = clean_h.std(0) > 0
    assert torch.allclose(ratio[alive], torch.full_like(ratio[alive], 0.5), rtol=0.2)
    with pytest.raises(ValueError, match="Expected `scales` to be non-negative"):
        noise_curve(net, x, y, layers=None, scales=torch.tensor([-1.0]))


def test_functional_counts_masks_area():
    counts = ablation_counts(torch.tensor([0.0, 0.3, 1.0]), 10)
    assert counts.tolist() == [0, 3, 10]
    orderings = torch.stack([torch.randperm(7) for _ in range(3)])
    keep = cumulative_keep_masks(orderings, torch.tensor([0, 2, 7]))
    for r in range(3):
        for k, m in enumerate([0, 2, 7]):
            expected = torch.ones(7, dtype=torch.bool)
            expected[orderings[r, :m]] = False
            assert torch.equal(keep[r, k], expected)
    x, y = torch.rand(9).sort().values, torch.rand(2, 9)
    assert np.allclose(curve_area(x, y).numpy(), np.trapezoid(y.numpy(), x.numpy(), axis=-1))
    with pytest.raises(ValueError, match="Expected `num_units` to be a positive int"):
        ablation_counts(torch.tensor([0.0]), 0)


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
@pytest.mark.parametrize("path", ["contributions", "columns"])
def test_cnn_shortcut_paths_equal_naive_loop(padding_mode, path):
    """Both ways of ablating through the conv after the first point (all units' contributions
    at once, or per newly ablated channel when those do not fit) match the naive loop."""
    calls = []
    net = cnn(dtype=torch.float64)
    net.features[5].padding_mode = padding_mode
    x, y = data(20, (2, 8, 8), classes=5)
    for value in ("zero", "mean"):
        curve = ablation_curve(
            net, x, y, layers=None, num_orderings=3, value=value,
            fractions=torch.linspace(0, 1, 9), generator=torch.Generator().manual_seed(2),
            shortcut_path=path,
        )  # fmt: skip
        calls += [1] * curve.paths.get(path, 0)  # the forward passes that took `path`
        modules = [net.features[4], net.features[7], net.features[9]]
        values = None
        if value == "mean":
            with torch.no_grad():
                h, values = x, []
                for i, layer in enumerate(net.features):
                    h = layer(h)
                    if i in (4, 7, 9):
                        values.append(h.mean(0))
        expected = naive_curve(net, x, y, modules, [1, 1, 1], curve.orderings, curve.counts, values)
        assert torch.equal(curve.accuracy, expected)
    assert calls


def _hand_masks(sizes, seed):
    """Masks that cover every case: nothing/everything ablated, a whole layer ablated while the
    next is partly kept, sparse and dense mixes (rows: masks, columns: units of each point)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    rows = [torch.ones(total, dtype=torch.bool), torch.zeros(total, dtype=torch.bool)]
    for share in (0.9, 0.6, 0.3, 0.1):
        rows.append(torch.rand(total, generator=g) < share)
    whole = torch.rand(total, generator=g) < 0.5
    whole[sizes[0] : sizes[0] + sizes[1]] = False  # the second point fully ablated
    rows.append(whole)
    return torch.stack(rows)


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_sparse_layers_after_later_points_match_hand_forward(value):
    """A layer that reads the previous point (here Linear 4 after ReLU 3 and Conv 8 after
    ReLU 7) computes only kept outputs from kept inputs; accuracy and loss match a forward pass
    written out by hand for each mask, in float64."""
    from lightning_probes.core import interventions as engine

    calls = []
    torch.manual_seed(0)
    mlp3 = nn.Sequential(
        nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(),
        nn.Linear(8, 4),
    ).double().eval()  # fmt: skip
    x, y = data(30)
    cases = [(mlp3, x, y, ("1", "3", "5"), "4"), (cnn(), *data(12, (2, 8, 8), 5), None, "8")]
    for net, inputs, targets, layers, sparse_layer in cases:
        trace = engine.trace_model(net, inputs, None if layers is None else ["0", "2", "4"], True)
        assert sparse_layer in {n.split(".")[-1] for n in trace.sparse}
        sizes = [p.num_units for p in trace.points]
        keep = _hand_masks(sizes, seed=1)
        values = [None] * 3
        if value == "mean":
            values = list(engine.point_statistics(net, inputs, trace)[0])
        masks = engine.Masks(list(keep.split(sizes, 1)), values, [p.unit_dim for p in trace.points])
        acc, loss = engine.evaluate_interventions(
            net, inputs, targets, trace, keep.shape[0], masks, masks=masks, with_loss=True
        )
        calls += [1] * trace.paths.get("sparse", 0)  # the passes that ran the sparse layer
        for r, row in enumerate(keep):
            handles = []
            for p, k, v in zip(trace.points, row.split(sizes), values):

                def hook(mod, a, o, k=k, v=v):
                    view = [1] * o.ndim
                    view[1] = -1
                    fill = torch.zeros_like(o) if v is None else v.expand_as(o)
                    return torch.where(k.view(view), o, fill)

                handles.append(p.module.register_forward_hook(hook))
            with torch.no_grad():
                logits = net(inputs)
            for h in handles:
                h.remove()
            assert float(acc[r]) == float((logits.argmax(-1) == targets).double().mean())
            ce = nn.functional.cross_entropy(logits, targets)
            assert torch.allclose(loss[r], ce, rtol=1e-12, atol=1e-12)
    assert calls


def test_sparse_layers_need_a_channelwise_path_to_their_point():
    def net(norm):
        return nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), norm,
            nn.ReLU(), nn.Linear(8, 3),
        ).eval()  # fmt: skip

    x = torch.randn(4, 6)
    assert list(trace_model(net(nn.BatchNorm1d(8)), x, ["0", "2", "4"], True).sparse) == ["4"]
    assert trace_model(net(nn.LayerNorm(8)), x, ["0", "2", "4"], True).sparse == {}
    assert trace_model(net(nn.Identity()), x, ["0", "4"], True).sparse == {}  # not adjacent


@pytest.mark.parametrize("layer", [0, 2])
def test_ablating_an_infinite_unit_gives_the_clean_result(layer):
    """A unit whose activity is +inf, once ablated, contributes exactly its ablation value
    (fast paths that multiply by the mask or subtract W h would give NaN)."""
    from lightning_probes.core.interventions import Masks, evaluate_interventions

    net = mlp()
    with torch.no_grad():
        net[layer].bias[3] = float("inf")
    x, y = data()
    trace = trace_model(net, x, None, True)
    sizes = [p.num_units for p in trace.points]
    keep = torch.ones(3, sum(sizes), dtype=torch.bool)
    offset = 0 if layer == 0 else sizes[0]
    keep[:, offset + 3] = False
    keep[1, [1, 15]] = False
    keep[2, :] = False
    masks = Masks(list(keep.split(sizes, 1)), [None, None], [-1, -1])
    acc, loss = evaluate_interventions(net, x, y, trace, 3, masks, masks=masks, with_loss=True)
    for r in range(3):
        k1, k2 = keep[r].split(sizes)
        with torch.no_grad():
            h1 = torch.where(k1, torch.relu(net[0](x)), 0.0)
            logits = net[4](torch.where(k2, torch.relu(net[2](h1)), 0.0))
        assert float(acc[r]) == float((logits.argmax(-1) == y).double().mean())
        assert torch.allclose(loss[r], nn.functional.cross_entropy(logits, y))
