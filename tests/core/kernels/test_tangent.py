"""Exact per-layer tangent kernels vs. torch.func per-sample Jacobians (float64)."""

from __future__ import annotations

import pytest
import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.kernels import capture as kernels_capture
from lightning_probes.core.kernels import factors as kernels_factors
from lightning_probes.core.kernels import forward_backward_kernels, layer_tangent_kernels
from lightning_probes.core.kernels.factors import AffineFactors

RTOL = 1e-6


def assert_close_kernels(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(
            got[name], want[name], rtol=RTOL, atol=1e-10 * want[name].abs().max()
        )


def mlp(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 6, bias=bias), nn.Tanh(),
        nn.Linear(6, 3, bias=bias),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["auto", "gram", "jacobian", "func"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_mlp_matches_torch_func(bias, method, chunk_size):
    net = mlp(bias)
    x = torch.randn(9, 5, dtype=torch.float64)
    got = layer_tangent_kernels(net, x, method=method, chunk_size=chunk_size)
    assert list(got) == ["0", "2", "4"]
    assert_close_kernels(got, reference_kernels(net, x, got))


def test_row_index_is_sample_times_outputs_plus_output():
    net = mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    K = layer_tangent_kernels(net, x, layers="0")["0"]
    w = net[0].weight
    # K[i*o + c, i*o + c] is the squared norm of d f_c(x_i) / d theta_0, by plain autograd
    for i, c in [(0, 0), (2, 1), (3, 2)]:
        gw, gb = torch.autograd.grad(net(x[i : i + 1])[0, c], [w, net[0].bias])
        expected = gw.square().sum() + gb.square().sum()
        torch.testing.assert_close(K[i * 3 + c, i * 3 + c], expected, rtol=RTOL, atol=0)


@pytest.mark.parametrize("method", ["auto", "gram", "jacobian", "func"])
def test_cnn_stride_padding_dilation_groups_padding_modes(method):
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(6, 6, (2, 3), stride=(1, 2), padding="valid", bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 1, 3),
    ).double().eval()  # fmt: skip
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    got = layer_tangent_kernels(net, x, method=method, chunk_size=3)
    assert list(got) == ["0", "2", "4", "7"]
    assert_close_kernels(got, reference_kernels(net, x, got))


@pytest.mark.parametrize("method", ["gram", "jacobian"])
def test_conv1d_same_padding_and_depthwise(method):
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same"), nn.ReLU(),
        nn.Conv1d(4, 4, 2, stride=2, groups=4, padding_mode="circular", padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(20, 3),
    ).double().eval()  # fmt: skip
    x = torch.randn(6, 2, 8, dtype=torch.float64)
    got = layer_tangent_kernels(net, x, method=method)
    assert_close_kernels(got, reference_kernels(net, x, got))


@pytest.mark.parametrize("method", ["auto", "gram", "jacobian"])
def test_linear_over_a_sequence_sums_over_positions(method):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Flatten(), nn.Linear(3 * 6, 2)
    ).double()
    x = torch.randn(7, 6, 4, dtype=torch.float64)
    got = layer_tangent_kernels(net, x, method=method)
    assert_close_kernels(got, reference_kernels(net, x, got))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, tokens):
        h = self.ln(self.emb(tokens)).mean(1)
        return self.fc(torch.relu(self.bn(h)))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fallback_embedding_layernorm_batchnorm_eval(chunk_size):
    torch.manual_seed(4)
    net = Tokens().double()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.ln.weight.uniform_(0.5, 2)
    net.eval()
    tokens = torch.randint(0, 11, (6, 5))
    got = layer_tangent_kernels(
        net, tokens, layers=["emb", "ln", "bn", "fc"], chunk_size=chunk_size
    )
    assert_close_kernels(got, reference_kernels(net, tokens, got))


def test_inplace_relu_after_layer_and_frozen_parameters():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 3, dtype=torch.float64)
    got = layer_tangent_kernels(net, x)
    assert not any(p.requires_grad for p in net.parameters())
    net_ref = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    net_ref.load_state_dict(net.state_dict())
    assert_close_kernels(got, reference_kernels(net_ref, x, got))


def test_output_dtype_follows_the_model_and_output_fn():
    net = mlp().float()
    wrapped = nn.ModuleDict({"body": net})

    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = net

        def forward(self, x):
            return {"logits": self.body(x)}

    x = torch.randn(4, 5)
    got = layer_tangent_kernels(Dict(), x, output_fn=lambda out: out["logits"])
    assert list(got) == ["body.0", "body.2", "body.4"] and wrapped is not None
    assert all(k.dtype == torch.float32 and k.shape == (12, 12) for k in got.values())
    want = reference_kernels(net.double(), x.double(), ["0", "2", "4"])
    for (_, k), (_, r) in zip(got.items(), want.items()):
        torch.testing.assert_close(k.double(), r, rtol=1e-4, atol=1e-5)


def test_one_batched_backward_for_all_outputs(monkeypatch):
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels_capture.torch.autograd, "grad", counting)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 10)).double().eval()
    layer_tangent_kernels(net, torch.randn(6, 5, dtype=torch.float64))
    assert calls == [True]  # o = 10 outputs, one batched backward


def test_cost_model_prefers_gram_for_linear_and_jacobian_for_wide_conv_maps():
    n, o = 64, 10
    linear = AffineFactors(torch.zeros(n, 1, 1, 512), torch.zeros(o, n, 1, 1, 512), True)
    conv = AffineFactors(torch.zeros(n, 1024, 1, 27), torch.zeros(o, n, 1024, 1, 16), True)
    assert linear.method == "gram" and conv.method == "jacobian"


def test_forward_backward_kernels_compose_to_the_layer_kernel():
    net = mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    fb = forward_backward_kernels(net, x)
    K = layer_tangent_kernels(net, x)
    for name, (forward, backward) in fb.items():
        assert forward.shape == (6, 6) and backward.shape == (18, 18)
        composed = forward.repeat_interleave(3, 0).repeat_interleave(3, 1) * backward
        torch.testing.assert_close(composed, K[name], rtol=RTOL, atol=0)
    a = net[1](net[0](x))  # input of layer 2
    norm = forward_backward_kernels(net, x, layers="2", normalize=True)["2"][0]
    torch.testing.assert_close(norm, (a @ a.T + 1) / 7, rtol=RTOL, atol=0)
    ln_net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="Expected nn.Linear layers for eq. \\(9\\), got 1"):
        forward_backward_kernels(ln_net, x, layers=["0", "1"])
    with pytest.raises(ValueError, match="receive \\[n, in_features\\] inputs for eq. \\(9\\)"):
        forward_backward_kernels(nn.Sequential(nn.Linear(5, 2), nn.Flatten()).double(), x[:, None])


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.block(torch.relu(self.block(self.inp(x)))))


def test_rejects_a_module_called_twice():
    with pytest.raises(
        ValueError, match="Expected layer 'block' to run exactly once per forward, got 2"
    ):
        layer_tangent_kernels(Shared(), torch.randn(3, 3))
    got = layer_tangent_kernels(Shared(), torch.randn(3, 3), layers=["inp", "out"])
    assert list(got) == ["inp", "out"]


def test_rejects_batchnorm_in_train_mode():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match="Expected BatchNorm layers in eval mode.*Got train mode in: 1"
    ):
        layer_tangent_kernels(net, torch.randn(5, 3))
    assert layer_tangent_kernels(net.eval(), torch.randn(5, 3))["2"].shape == (10, 10)


def test_other_errors():
    net = mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected layers that own parameters, got '1'"):
        layer_tangent_kernels(net, x, layers=["1"])
    with pytest.raises(ValueError, match="Layer 'nope' not found"):
        layer_tangent_kernels(net, x, layers="nope")
    with pytest.raises(
        ValueError, match="logits of shape \\[n, o\\] = \\[3, o\\], got \\(3, 1, 3\\)"
    ):
        layer_tangent_kernels(net, x, output_fn=lambda out: out[:, None])
    with pytest.raises(ValueError, match="`method` can be auto, gram, jacobian, func, got 'fast'"):
        layer_tangent_kernels(net, x, method="fast")
    with pytest.raises(
        ValueError, match="Expected `chunk_size` to be a positive int or None, got 0"
    ):
        layer_tangent_kernels(net, x, chunk_size=0)


@pytest.mark.parametrize("side", [1, 2, 5])  # samples per tile of conv 2 (uneven last tiles)
@pytest.mark.parametrize("chunk_size", [None, 3])  # diagonal blocks mirror tiles; others not
@pytest.mark.parametrize("one_tile_per_f", [False, True])  # F over all columns, or per tile
def test_tiled_position_pair_route_matches_torch_func(
    side, chunk_size, one_tile_per_f, monkeypatch
):
    """The forward-Gram route in tiles of a few samples (groups, bias, no bias, stride)."""
    # conv 2: t = 4 positions, m = 3 channels per group, o = 3 outputs
    monkeypatch.setattr(kernels_factors, "TILE_ELEMENTS", side**2 * 4 * 3 * 3)
    if one_tile_per_f:
        monkeypatch.setattr(kernels_factors, "F_ELEMENTS", 1)
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
    ).double().eval()  # fmt: skip
    x = torch.randn(11, 3, 4, 4, dtype=torch.float64)
    got = layer_tangent_kernels(net, x, layers=["0", "2"], method="gram", chunk_size=chunk_size)
    assert_close_kernels(got, reference_kernels(net, x, got))
