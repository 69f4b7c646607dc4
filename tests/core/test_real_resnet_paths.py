"""The paths this round added for conv models, on the tests' torchvision-style ResNet-18.

- loss planes of models with convolutions run one forward per point (not ``vmap``);
- narrow layers' stable rank comes from their P x P Gram by block Lanczos above P = 128.
Both against naive float64 references.
"""

from __future__ import annotations

import copy

import torch
from real_models import ResNet18
from reference import reference_kernels

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.kernels.stats import layer_alignments
from lightning_probes.core.landscape import batched_probe_loss, trainable_parameters
from lightning_probes.functional.alignment import center_kernel


def resnet() -> ResNet18:
    torch.manual_seed(0)
    return ResNet18(width=4, classes=3).double().eval()  # BatchNorm and downsample branches


def test_loss_at_points_of_a_resnet_equals_a_copy_per_point():
    net = resnet()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    theta = trainable_parameters(net)
    stacked = {
        k: torch.stack([v + 0.01 * i * v.sign() for i in range(3)]) for k, v in theta.items()
    }
    got = batched_probe_loss(net, ProbeSet(x, y), stacked)
    want = []
    for i in range(3):
        copy_ = copy.deepcopy(net)
        with torch.no_grad():
            for k, p in copy_.named_parameters():
                p.copy_(stacked[k][i])
            want.append(torch.nn.functional.cross_entropy(copy_(x), y))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=0)


def test_stable_rank_of_a_narrow_resnet_conv_equals_the_full_kernels_spectrum():
    net = resnet()
    x = torch.randn(120, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    name = "layer2.0.conv1"  # P = 4·8·9 = 288 > 128 (Lanczos) and < n·o = 360 (narrow)
    got = layer_alignments(net, x, y, layers=[name])[name].stable_rank
    (kernel,) = reference_kernels(net, x, [name]).values()
    kc = center_kernel(kernel, 3)
    want = kc.square().sum() / torch.linalg.eigvalsh(kc).abs().max() ** 2
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_statistics_of_a_float32_narrow_resnet_conv_equal_float64_references():
    """A float32 J's P x P Gram is formed in float32 (sums in float64): float32-accurate."""
    net = resnet()
    x = torch.randn(120, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    name = "layer2.0.conv1"  # narrow: P = 288 < n·o = 360
    got = layer_alignments(net.float(), x.float(), y, layers=[name])[name]
    (kernel,) = reference_kernels(net.double(), x, [name]).values()
    kc = center_kernel(kernel, 3)
    yc = torch.nn.functional.one_hot(y, 3).double()
    yc = (yc - yc.mean(0)).reshape(-1)
    frob = kc.square().sum().sqrt()
    want = {
        "alignment": yc @ kc @ yc / (frob * yc.square().sum()),
        "trace": kernel.trace(),
        "frobenius": frob,
        "stable_rank": frob**2 / torch.linalg.eigvalsh(kc).abs().max() ** 2,
    }
    for key, value in want.items():
        torch.testing.assert_close(getattr(got, key), value, rtol=2e-5, atol=0, msg=key)


def test_forward_gram_route_of_resnet_convs_equals_float64_jacrev_kernels(monkeypatch):
    """The tiled forward-Gram route on the ResNet's later convs (BatchNorm, downsample)."""
    from lightning_probes.core.kernels import factors, layer_tangent_kernels

    monkeypatch.setattr(factors, "TILE_ELEMENTS", 2**10)  # tiles of 1-2 samples: mirrored
    net = resnet()
    x = torch.randn(7, 3, 16, 16, dtype=torch.float64)
    layers = ["layer3.0.conv2", "layer4.0.conv1", "layer4.0.downsample.0", "layer4.1.conv2"]
    got = layer_tangent_kernels(net, x, layers=layers, method="gram")
    want = reference_kernels(net, x, layers)
    for name in layers:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12)
