"""The layer-chain path of loss planes and paths (core/landscape/affine.py), in float64.

Reference: the point's weights written into a deep copy of the network, which is run on the
whole probe set; the loss is computed by hand (log-softmax picked at the target, or squared
error), independent of the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.landscape import (
    loss_along_path,
    loss_plane,
    random_direction,
    trainable_parameters,
)
from lightning_probes.core.landscape.affine import affine_family_loss
from lightning_probes.core.landscape.chain import trace_chain

Params = dict[str, torch.Tensor]


def reference_loss(net: nn.Module, data: ProbeSet, params: Params, ignore: int = -100) -> float:
    clone = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if name in params:
                p.copy_(params[name])
        out = clone(data.inputs)
    t = data.targets
    assert t is not None
    if torch.is_floating_point(t):
        return float((out - t).square().mean())
    keep = t != ignore
    log_probs = out - out.logsumexp(dim=1, keepdim=True)
    picked = log_probs[torch.arange(len(t)), t.clamp_min(0)]
    return float(-picked[keep].sum() / keep.sum())


def check_plane(net: nn.Module, data: ProbeSet, u: Params, v: Params, **kwargs) -> None:
    center = trainable_parameters(net)
    before = copy.deepcopy(net.state_dict())
    plane = loss_plane(net, data, center, u, v, resolution=4, span=0.9, **kwargs)
    for i, b in enumerate(plane.betas):
        for j, a in enumerate(plane.alphas):
            point = {k: center[k] + a * u[k] + b * v[k] for k in center}
            want = reference_loss(net, data, point)
            assert float(plane.losses[i, j]) == pytest.approx(want, rel=1e-10, abs=1e-12)
    for k, val in net.state_dict().items():  # the model was never written
        assert torch.equal(val, before[k])


def directions(net: nn.Module, seed: int = 2) -> tuple[Params, Params]:
    center = trainable_parameters(net)
    gen = torch.Generator().manual_seed(seed)
    return (
        random_direction(center, generator=gen, one_dim="norm"),
        random_direction(center, generator=gen, one_dim="norm"),
    )


def mlp(out: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, out)
    ).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, stride=2, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(5, 3),
    ).double()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        net(torch.randn(16, 2, 8, 8, dtype=torch.float64) * 2 + 1)
    return net.eval()


def classes(n: int, shape: tuple[int, ...], k: int = 3, seed: int = 1) -> ProbeSet:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return ProbeSet(x, torch.randint(0, k, (n,), generator=gen))


@pytest.mark.parametrize(("chunk_size", "points_per_call"), [(None, None), (7, 3), (None, 1)])
def test_mlp_plane(chunk_size, points_per_call):
    net, data = mlp(), classes(30, (6,))
    assert trace_chain(net, data.inputs) is not None
    check_plane(net, data, *directions(net), chunk_size=chunk_size, points_per_call=points_per_call)


def test_wide_head_and_squared_error():
    net = mlp(out=40)  # a head too wide for the output-major product
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    data = ProbeSet(x, torch.randn(20, 40, generator=gen, dtype=torch.float64))
    check_plane(net, data, *directions(net))


def test_cnn_with_batchnorm_pooling_and_eval_dropout():
    net, data = cnn(), classes(12, (2, 8, 8))
    chain = trace_chain(net, data.inputs)
    assert chain is not None and len(chain) == 10
    check_plane(net, data, *directions(net), chunk_size=5)


def test_conv1d_layernorm_inside_a_wrapper():
    class Wrapper(nn.Module):  # like a LightningModule holding the network
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.LayerNorm(12))
            self.head = nn.Sequential(nn.SiLU(), nn.Linear(12, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    torch.manual_seed(0)
    net = Wrapper().double().eval()
    data = classes(15, (2, 6))
    assert trace_chain(net, data.inputs) is not None
    check_plane(net, data, *directions(net))


def test_unmoved_leading_layers_are_shared():
    net, data = cnn(), classes(10, (2, 8, 8))
    u, v = directions(net)
    for d in (u, v):  # the directions leave the first conv and the BatchNorm alone
        for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
            d[k] = torch.zeros_like(d[k])
    check_plane(net, data, u, v)
    net[0].weight.requires_grad_(False)  # frozen: not among the plane's parameters at all
    center = trainable_parameters(net)
    u = {k: x for k, x in u.items() if k in center}
    v = {k: x for k, x in v.items() if k in center}
    check_plane(net, data, u, v)
    zero = {k: torch.zeros_like(x) for k, x in center.items()}  # nothing moves
    losses = affine_family_loss(net, data, center, [zero], torch.ones(3, 1, dtype=torch.float64))
    assert losses is not None
    torch.testing.assert_close(losses, torch.full((3,), reference_loss(net, data, center)).double())


def test_ignored_targets_and_custom_loss():
    net, data = mlp(), classes(25, (6,))
    assert data.targets is not None
    data.targets[::4] = -100  # cross-entropy's ignore_index: the mean is over the others
    check_plane(net, data, *directions(net))
    plain = classes(25, (6,))
    center = trainable_parameters(net)
    u, v = directions(net)

    def loss_fn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (out.logsumexp(1) - out[torch.arange(len(t)), t]).mean() * 2.0

    plane = loss_plane(net, plain, center, u, v, resolution=3, loss_fn=loss_fn)
    for i, b in enumerate(plane.betas):
        for j, a in enumerate(plane.alphas):
            point = {k: center[k] + a * u[k] + b * v[k] for k in center}
            want = 2.0 * reference_loss(net, plain, point)
            assert float(plane.losses[i, j]) == pytest.approx(want, rel=1e-10)


def test_path_and_fallback_agree_with_the_reference():
    net, data = cnn(), classes(9, (2, 8, 8))
    a = trainable_parameters(net)
    u, v = directions(net, seed=4)
    b = {k: a[k] + u[k] for k in a}
    c = {k: a[k] - v[k] for k in a}
    t, fast = loss_along_path(net, data, [a, b, c], points_per_segment=3)
    _, slow = loss_along_path(net, data, [a, b, c], points_per_segment=3, structured=False)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=0)
    for ti, li in zip(t.tolist(), fast.tolist()):
        s, frac = (0, ti) if ti <= 1 else (1, ti - 1)
        start, end = [(a, b), (b, c)][s]
        point = {k: (1 - frac) * start[k] + frac * end[k] for k in a}
        assert li == pytest.approx(reference_loss(net, data, point), rel=1e-10)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


class InPlace(Residual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.mul_(2.0)  # not a layer: the chain must not skip it
        return self.b(h)


class Custom(nn.Linear):  # a subclass may compute anything
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "net",
    [
        Residual(),
        InPlace(),
        nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, 3)),
        nn.Sequential(Custom(6, 3)),
        nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1)),  # a dim could be the sample axis
    ],
)
def test_models_outside_the_chain_fall_back_to_vmap(net):
    net = net.double().eval()
    data = classes(12, (6,))
    assert trace_chain(net, data.inputs) is None
    check_plane(net, data, *directions(net))


def test_hooked_layer_falls_back():
    net, data = mlp(), classes(12, (6,))
    handle = net[2].register_forward_hook(lambda m, i, o: o * 3.0)
    try:
        assert trace_chain(net, data.inputs) is None
        check_plane(net, data, *directions(net))
    finally:
        handle.remove()
