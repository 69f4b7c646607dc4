"""Loss planes and paths (core/landscape.py) against per-point evaluation of model copies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.landscape import (
    batched_probe_loss,
    combine,
    flatten,
    loss_along_path,
    loss_plane,
    orthogonalize,
    random_direction,
    trainable_parameters,
)


def make_net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    net = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        net.train()
        with torch.no_grad():
            net(torch.randn(32, 6, dtype=torch.float64) * 3 + 1)
    return net.eval()


def make_data(n: int = 40) -> ProbeSet:
    gen = torch.Generator().manual_seed(1)
    return ProbeSet(
        torch.randn(n, 6, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=gen),
    )


def reference_loss(net: nn.Module, data: ProbeSet, params: dict[str, torch.Tensor]) -> float:
    """Independent reference: write the weights into a deep copy and run it on the whole set."""
    clone = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name in params:
                p.copy_(params[name])
        logits = clone(data.inputs)
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    return float(-log_probs[torch.arange(len(data)), data.targets].mean())


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize(("chunk_size", "points_per_call"), [(None, None), (7, 5), (40, 1)])
def test_plane_equals_per_point_evaluation(bn, chunk_size, points_per_call):
    net, data = make_net(bn), make_data()
    before = copy.deepcopy(net.state_dict())
    center = trainable_parameters(net)
    gen = torch.Generator().manual_seed(2)
    u, v = random_direction(center, generator=gen), random_direction(center, generator=gen)
    plane = loss_plane(
        net,
        data,
        center,
        u,
        v,
        resolution=5,
        span=0.8,
        chunk_size=chunk_size,
        points_per_call=points_per_call,
    )
    assert plane.losses.shape == (5, 5)
    torch.testing.assert_close(plane.alphas, torch.linspace(-0.8, 0.8, 5, dtype=torch.float64))
    for i, b in enumerate(plane.betas):
        for j, a in enumerate(plane.alphas):
            point = {k: center[k] + a * u[k] + b * v[k] for k in center}
            assert float(plane.losses[i, j]) == pytest.approx(
                reference_loss(net, data, point), rel=1e-10
            )
    # the model was never written
    for k, val in net.state_dict().items():
        assert torch.equal(val, before[k])


def test_plane_with_explicit_uneven_grid():
    net, data = make_net(), make_data()
    center = trainable_parameters(net)
    u = {k: torch.ones_like(p) for k, p in center.items()}
    v = {k: -torch.ones_like(p) * 0.5 for k, p in center.items()}
    alphas, betas = torch.tensor([0.0, 0.1, 0.5]), torch.tensor([-0.2, 0.3])
    plane = loss_plane(net, data, center, u, v, alphas=alphas, betas=betas)
    assert plane.losses.shape == (2, 3)
    a, b = plane.alphas[2], plane.betas[1]  # float32 0.5 and 0.3, as given
    point = {k: center[k] + a * u[k] + b * v[k] for k in center}
    assert float(plane.losses[1, 2]) == pytest.approx(reference_loss(net, data, point), rel=1e-10)


def test_path_through_anchors():
    net, data = make_net(), make_data()
    a = trainable_parameters(net)
    gen = torch.Generator().manual_seed(3)
    b = {k: p + d for (k, p), d in zip(a.items(), random_direction(a, generator=gen).values())}
    c = {k: -p for k, p in a.items()}
    t, losses = loss_along_path(net, data, [a, b, c], points_per_segment=4)
    assert t.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])
    for ti, li in zip(t.tolist(), losses.tolist()):
        s, frac = (0, ti) if ti <= 1 else (1, ti - 1)
        start, end = [(a, b), (b, c)][s]
        point = {k: (1 - frac) * start[k] + frac * end[k] for k in a}
        assert li == pytest.approx(reference_loss(net, data, point), rel=1e-10)
    with pytest.raises(ValueError, match="Expected at least 2 `anchors`, got 1"):
        loss_along_path(net, data, [a])
    with pytest.raises(ValueError, match="Expected `points_per_segment` to be an int >= 2, got 1"):
        loss_along_path(net, data, [a, b], points_per_segment=1)


def test_random_direction_is_filter_normalised_and_seeded():
    net = make_net()
    params = trainable_parameters(net)
    d1 = random_direction(params, generator=torch.Generator().manual_seed(5))
    d2 = random_direction(params, generator=torch.Generator().manual_seed(5))
    for k, p in params.items():
        assert torch.equal(d1[k], d2[k])
        if p.ndim == 2:
            torch.testing.assert_close(d1[k].norm(dim=1), p.norm(dim=1))
        else:  # biases stay put by default (Li et al.'s ignore='biasbn')
            assert torch.equal(d1[k], torch.zeros_like(p))
    whole = random_direction(
        params, generator=torch.Generator().manual_seed(5), normalization="model"
    )
    assert float(flatten(whole).norm()) == pytest.approx(float(flatten(params).norm()))
    with pytest.raises(ValueError, match="`normalization` can be 'filter' or 'model', got 'layer'"):
        random_direction(params, normalization="layer")


def test_orthogonalize_and_combine():
    gen = torch.Generator().manual_seed(6)
    a = {
        "w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }
    d = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in a.items()}
    o = orthogonalize(d, a)
    assert float(flatten(o) @ flatten(a)) == pytest.approx(0.0, abs=1e-12)
    coefs = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    stacked = combine(a, [d, o], coefs)
    torch.testing.assert_close(stacked["w"][0], a["w"] + d["w"] + 2 * o["w"])
    torch.testing.assert_close(stacked["b"][1], a["b"] - o["b"])


def test_batched_loss_default_grouping_respects_budget():
    net, data = make_net(), make_data()
    center = trainable_parameters(net)
    coefs = torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    stacked = combine(center, [center], coefs)
    tiny = batched_probe_loss(net, data, stacked, memory_budget_mb=1e-4)  # one point per call
    big = batched_probe_loss(net, data, stacked)
    torch.testing.assert_close(tiny, big)
    point = {k: v[3] for k, v in stacked.items()}
    assert float(big[3]) == pytest.approx(reference_loss(net, data, point), rel=1e-10)
