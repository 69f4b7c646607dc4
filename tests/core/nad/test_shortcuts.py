"""core.nad first_layer/local/second_stage: secant shortcuts equal a naive loop, used if exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.core.nad import network_gradients
from lightning_probes.core.nad.evaluator import ChunkEvaluator, network_state
from lightning_probes.core.nad.first_layer import FirstLayer
from lightning_probes.core.nad.local import LocalPrefix


def _naive(net, x0, step=100.0):
    """One basis vector at a time, both signs, full forward: (f(x0+h e_i) - f(x0-h e_i)) / 2h."""
    flat = x0.reshape(-1)
    out = torch.empty(flat.numel(), dtype=x0.dtype)
    with torch.no_grad():
        for i in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[i] = step
            plus = -net((flat + e).reshape(1, *x0.shape))
            minus = -net((flat - e).reshape(1, *x0.shape))
            out[i] = (plus - minus).reshape(-1)[0] / (2 * step)
    return out


class LeNetLike(nn.Module):
    """The authors' LeNet layout, small: functional relu and max_pool2d."""

    def __init__(self, cin=1, pool_first=False, act=F.relu, size=12):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * ((size - 2) // 2 - 2) ** 2, 1)
        self.pool_first, self.act = pool_first, act

    def forward(self, x):
        if self.pool_first:
            out = self.act(F.max_pool2d(self.conv1(x), 2))
        else:
            out = F.max_pool2d(self.act(self.conv1(x)), 2)
        out = F.relu(self.conv2(out))
        return self.fc(out.view(out.size(0), -1))


class TwoStage(nn.Module):
    """conv -> act -> pool -> conv -> act -> pool -> linear: both stages evaluated locally."""

    def __init__(self, size=(16, 16), cin=1, conv1=None, conv2=None, pool2=2, act=F.relu):
        super().__init__()
        self.conv1 = conv1 or nn.Conv2d(cin, 3, 3)
        self.conv2 = conv2 or nn.Conv2d(3, 4, 3)
        self.pool2, self.act = pool2, act
        with torch.no_grad():
            n = self.features(torch.zeros(1, self.conv1.in_channels, *size)).numel()
        self.fc = nn.Linear(n, 1)

    def features(self, x):
        out = F.max_pool2d(self.act(self.conv1(x)), 2)
        return self.act(F.max_pool2d(self.conv2(out), self.pool2))

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _sequential(conv, pool, size):
    out = conv(torch.zeros(1, conv.in_channels, *size))
    out = pool(torch.relu(out))
    return nn.Sequential(
        conv, nn.ReLU(), pool, nn.Identity(), nn.Tanh(), nn.Flatten(), nn.Linear(out.numel(), 1)
    )


LOCAL_NETS = {
    "lenet": (lambda: LeNetLike(), (1, 12, 12)),
    "pool_then_relu": (lambda: LeNetLike(pool_first=True), (1, 12, 12)),
    "tanh_three_channels": (lambda: LeNetLike(cin=3, act=torch.tanh), (3, 12, 12)),
    "strided_padded": (
        lambda: _sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.MaxPool2d(2), (9, 7)),
        (2, 9, 7),
    ),
    "dilated_overlapping_pool": (
        lambda: _sequential(
            nn.Conv2d(1, 2, 3, dilation=2, padding=2), nn.MaxPool2d(3, stride=2), (8, 9)
        ),
        (1, 8, 9),
    ),
    "unit_pool": (lambda: _sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(1), (8, 7)), (1, 8, 7)),
    "rectangular_pool_drops_rows": (
        lambda: _sequential(nn.Conv2d(1, 2, (2, 3)), nn.MaxPool2d((3, 2)), (8, 7)),
        (1, 8, 7),
    ),
}


TWO_STAGE = {
    "lenet": (lambda: TwoStage(), (1, 16, 16)),
    "padded_conv2_pool3_tanh": (
        lambda: TwoStage((15, 17), conv2=nn.Conv2d(3, 2, 3, padding=2), pool2=3, act=torch.tanh),
        (1, 15, 17),
    ),
    "unit_pool2": (lambda: TwoStage((10, 10), pool2=1), (1, 10, 10)),
    "strided_conv1_rgb_rect_kernel": (
        lambda: TwoStage(
            (26, 22), conv1=nn.Conv2d(3, 3, 3, stride=2, padding=1), conv2=nn.Conv2d(3, 2, (2, 3))
        ),
        (3, 26, 22),
    ),
}


@pytest.mark.parametrize("name", list(TWO_STAGE))
def test_second_stage_equals_a_naive_loop(name):
    torch.manual_seed(5)
    factory, shape = TWO_STAGE[name]
    net = factory().double().eval()
    x0 = torch.randn(shape, dtype=torch.float64)
    ev = _evaluator(net, x0)
    assert isinstance(ev.first, LocalPrefix) and ev.first.stage2 is not None
    ev.block = 11
    got = ev([network_state(net)])[0]
    torch.testing.assert_close(got, _naive(net, x0), rtol=1e-10, atol=1e-12)


def test_second_stage_only_where_supported():
    torch.manual_seed(6)
    net = TwoStage(conv2=nn.Conv2d(3, 4, 3, stride=2)).double().eval()
    x0 = torch.randn(1, 16, 16, dtype=torch.float64)
    ev = _evaluator(net, x0)
    assert isinstance(ev.first, LocalPrefix) and ev.first.stage2 is None
    torch.testing.assert_close(ev([network_state(net)])[0], _naive(net, x0), rtol=1e-10, atol=1e-12)


def _evaluator(net, x0, chunk=1):
    ev = ChunkEvaluator(net, x0, "secant", 100.0, 0, None)
    ev.plan(chunk, None)
    return ev


@pytest.mark.parametrize("name", list(LOCAL_NETS))
def test_local_prefix_equals_a_naive_loop(name):
    torch.manual_seed(0)
    factory, shape = LOCAL_NETS[name]
    net = factory().double().eval()
    x0 = torch.randn(shape, dtype=torch.float64)
    ev = _evaluator(net, x0)
    assert isinstance(ev.first, LocalPrefix)
    ev.block = 7  # several blocks, the last one partial
    got = ev([network_state(net)])[0]
    torch.testing.assert_close(got, _naive(net, x0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [TwoStage, LeNetLike])  # with and without a second stage
def test_local_prefix_vmapped_chunks_equal_the_loop(cls):
    torch.manual_seed(1)
    size = 16 if cls is TwoStage else 12
    nets = [cls().double() for _ in range(4)]
    x0 = torch.randn(1, size, size, dtype=torch.float64)
    it = iter(nets)
    grads, _ = network_gradients(
        lambda: next(it), (1, size, size), num_networks=4, eval_point=x0, chunk_size=3
    )
    expected = torch.stack([_naive(n.eval(), x0) for n in nets])
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)
    ev = _evaluator(nets[0], x0)
    ev([network_state(n) for n in nets[:3]])
    assert ev.vectorize_first  # the shortcut itself ran under vmap, no fallback


class ConvHead(nn.Module):
    """Conv without pooling, then a BatchNorm: only the first layer is built from weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize(
    ("factory", "shape"),
    [
        (ConvHead, (2, 5, 6)),
        (lambda: nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)), (7,)),
    ],
)
def test_first_layer_shortcut_equals_a_naive_loop(factory, shape, chunk):
    torch.manual_seed(2)
    nets = [factory().double() for _ in range(3)]
    for n in nets:  # non-trivial running statistics
        for m in n.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x0 = torch.randn(shape, dtype=torch.float64)
    ev = _evaluator(nets[0].eval(), x0)
    assert isinstance(ev.first, FirstLayer)
    ev([network_state(n) for n in nets])
    assert ev.vectorize_first
    it = iter(nets)
    grads, _ = network_gradients(
        lambda: next(it), shape, num_networks=3, eval_point=x0, chunk_size=chunk
    )
    expected = torch.stack([_naive(net.eval(), x0) for net in nets])
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-12)


class InputTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 1)

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv(x)), 1)
        return self.fc(out.flatten(1)) + x.flatten(1)[:, :1] ** 2


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.fc = nn.Linear(36, 1)

    def forward(self, x):
        out = F.max_pool2d(torch.relu(self.conv(x)), 1)
        return self.fc(self.conv(out).flatten(1))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 1)

    def forward(self, x):
        return self.fc(F.max_pool2d(torch.relu(self.conv(2 * x)), 1).flatten(1))


@pytest.mark.parametrize("cls", [InputTwice, SharedConv, Scaled])
def test_no_shortcut_where_it_would_not_be_exact(cls):
    torch.manual_seed(3)
    net = cls().double().eval()
    x0 = torch.randn(1, 6, 6, dtype=torch.float64)
    ev = _evaluator(net, x0)
    assert ev.first is None
    torch.testing.assert_close(ev([network_state(net)])[0], _naive(net, x0), rtol=1e-10, atol=1e-12)


def test_float32_lenet_matches_the_float64_loop_within_rounding():
    torch.manual_seed(4)
    net = TwoStage((20, 20)).eval()
    x0 = torch.randn(1, 20, 20)
    ev = _evaluator(net, x0)
    assert isinstance(ev.first, LocalPrefix) and ev.first.stage2 is not None
    got = ev([network_state(net)])[0].double()
    expected = _naive(net.double(), x0.double())
    # float32 rounding of values of size |h w| ~ 100 * 0.3, divided by 2h
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
