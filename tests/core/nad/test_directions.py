"""core.nad: gradients against the authors' loop, PCA properties, seeding, chunking."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev

from lightning_probes.core.nad import (
    fresh_network_factory,
    input_gradient_energy,
    network_gradients,
    neural_anisotropy_directions,
)


class TinyCNN(nn.Module):
    """1x6x6 input, conv -> relu -> maxpool -> linear, ``outputs`` outputs."""

    def __init__(self, outputs: int = 1, batchnorm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3) if batchnorm else nn.Identity()
        self.fc = nn.Linear(3 * 2 * 2, outputs)

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(h.flatten(1))


class FirstPixel(nn.Module):
    """Sees only input coordinate 0 (a nonlinear function of it)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x.flatten(1)[:, :1] / 100.0)


def _iterate(nets):
    it = iter(nets)
    return lambda: next(it)


def _authors_gradients(nets, x0, step=100.0):
    """The authors' procedure: one network at a time on the batch of all +-step e_i inputs."""
    d = x0.numel()
    basis = step * torch.eye(d, dtype=x0.dtype).reshape(d, *x0.shape)
    with torch.no_grad():
        return torch.stack(
            [((-net.eval()(x0 + basis)) - (-net(x0 - basis)))[:, 0] / (2 * step) for net in nets]
        )


def _nets(n, seed=0, **kwargs):
    torch.manual_seed(seed)
    return [TinyCNN(**kwargs).double() for _ in range(n)]


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_secant_gradients_match_the_authors_loop(chunk_size):
    nets = _nets(5)
    x0 = torch.randn(1, 6, 6, dtype=torch.float64)
    grads, point = network_gradients(
        _iterate(nets), (1, 6, 6), num_networks=5, eval_point=x0, chunk_size=chunk_size
    )
    assert torch.equal(point, x0)
    torch.testing.assert_close(grads, _authors_gradients(nets, x0), rtol=1e-10, atol=1e-13)


def test_autograd_gradients_match_torch_func():
    nets = _nets(4, batchnorm=True)
    x0 = torch.randn(1, 6, 6, dtype=torch.float64)
    grads, _ = network_gradients(
        _iterate(nets), (1, 6, 6), num_networks=4, method="autograd", eval_point=x0, chunk_size=2
    )
    ref = torch.stack(
        [-jacrev(lambda x, net=net: net.eval()(x[None]).sum())(x0).flatten() for net in nets]
    )
    torch.testing.assert_close(grads, ref)


def test_secant_equals_autograd_for_a_linear_model():
    def factory():
        return nn.Linear(10, 1).double()

    kwargs = {"num_networks": 6, "generator": torch.Generator().manual_seed(1)}
    secant, _ = network_gradients(factory, (10,), method="secant", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(1)
    autograd, _ = network_gradients(factory, (10,), method="autograd", **kwargs)
    torch.testing.assert_close(secant, autograd, rtol=1e-9, atol=1e-12)


def test_several_outputs_are_projected_on_one_fixed_unit_vector():
    nets = _nets(6, outputs=3)
    x0 = torch.randn(1, 6, 6, dtype=torch.float64)
    grads, _ = network_gradients(
        _iterate(nets), (1, 6, 6), num_networks=6, method="autograd", eval_point=x0
    )
    # per network the Jacobian J (3, d); grads = -J^T u for one u shared by all networks
    with torch.no_grad():
        jac = torch.cat(
            [jacrev(lambda x, net=net: net.eval()(x[None])[0])(x0).reshape(3, -1) for net in nets],
            1,
        )
    u = torch.linalg.lstsq(-jac.T.detach(), grads.reshape(-1, 1)).solution
    torch.testing.assert_close(-jac.T @ u, grads.reshape(-1, 1))
    assert abs(float(u.norm()) - 1.0) < 1e-8


def test_results_do_not_depend_on_chunking_and_are_seeded():
    def run(**kwargs):
        return neural_anisotropy_directions(
            lambda: TinyCNN().double(),
            (1, 6, 6),
            num_networks=12,
            generator=torch.Generator().manual_seed(5),
            **kwargs,
        )

    base = run(chunk_size=1)
    for kwargs in ({"chunk_size": 5}, {"chunk_size": 12, "memory_budget": 1}, {"chunk_size": 64}):
        other = run(**kwargs)
        torch.testing.assert_close(other.singular_values, base.singular_values)
        torch.testing.assert_close(other.directions, base.directions)
    assert torch.equal(run(chunk_size=1).directions, base.directions)
    different = neural_anisotropy_directions(
        lambda: TinyCNN().double(), (1, 6, 6), num_networks=12, generator=torch.Generator()
    )
    assert not torch.allclose(different.singular_values, base.singular_values)


def test_generator_leaves_the_global_rng_untouched():
    state = torch.get_rng_state()
    neural_anisotropy_directions(
        TinyCNN, (1, 6, 6), num_networks=4, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(state, torch.get_rng_state())


def test_logistic_regression_spectrum_is_flat():
    d = 16
    nads = neural_anisotropy_directions(
        lambda: nn.Linear(d, 1), (d,), num_networks=2000, generator=torch.Generator()
    )
    s = nads.singular_values
    # isotropic weights: eigenvalue spread only from sampling, (1 +- sqrt(d/m))^2 ~ 1.2^2
    assert float(s[0] / s[-1]) < 1.6
    torch.testing.assert_close(
        nads.explained_variance_ratio,
        torch.full((d,), 1 / d, dtype=torch.float64),
        atol=0.03,
        rtol=0,
    )
    gram = nads.directions @ nads.directions.T
    torch.testing.assert_close(gram, torch.eye(d, dtype=torch.float64))


def test_a_model_seeing_only_the_first_pixel_has_one_dominant_nad():
    nads = neural_anisotropy_directions(
        FirstPixel, (2, 3, 3), num_networks=50, k=3, generator=torch.Generator().manual_seed(0)
    )
    assert nads.directions.shape == (3, 2, 3, 3)
    expected = torch.zeros(2, 3, 3, dtype=torch.float64)
    expected[0, 0, 0] = 1.0
    torch.testing.assert_close(nads.directions[0], expected)
    assert float(nads.explained_variance_ratio[0]) > 1 - 1e-9
    assert float(nads.singular_values[1]) < 1e-9 * float(nads.singular_values[0])


def test_lowrank_path_matches_full():
    kwargs = {"num_networks": 40, "k": 3, "generator": torch.Generator().manual_seed(2)}
    full = neural_anisotropy_directions(lambda: TinyCNN(), (1, 6, 6), svd="full", **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(2)
    low = neural_anisotropy_directions(lambda: TinyCNN(), (1, 6, 6), svd="lowrank", **kwargs)
    torch.testing.assert_close(
        low.singular_values.double(), full.singular_values, rtol=1e-3, atol=0
    )


def test_vmap_failure_falls_back_to_a_loop_with_a_warning():
    class Branchy(TinyCNN):
        def forward(self, x):
            out = super().forward(x)
            return out if float(out.sum()) > -1e9 else -out  # data-dependent: no vmap

    nets = [Branchy().double() for _ in range(3)]
    x0 = torch.randn(1, 6, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="evaluating the networks one at a time, since vmap"):
        grads, _ = network_gradients(
            _iterate(nets), (1, 6, 6), num_networks=3, eval_point=x0, chunk_size=3
        )
    torch.testing.assert_close(grads, _authors_gradients(nets, x0), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_networks": 1}, "Expected `num_networks` to be an int >= 2, got 1"),
        ({"method": "forward"}, "`method` can be 'secant' or 'autograd', got 'forward'"),
        ({"step": 0.0}, "Expected `step` to be a positive float, got 0.0"),
        (
            {"eval_point": torch.zeros(3)},
            r"Expected `eval_point` to have `input_shape` \(1, 6, 6\)",
        ),
        ({"k": 37}, r"Expected `k` to be an int in \[1, min\(m, d\) = 4\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs = {"num_networks": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        neural_anisotropy_directions(TinyCNN, (1, 6, 6), **kwargs)


def test_fresh_network_factory_leaves_the_model_and_draws_new_weights():
    model = TinyCNN(batchnorm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factory = fresh_network_factory(model)
    first = {k: v.clone() for k, v in factory().state_dict().items()}
    second = factory().state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not torch.equal(first["conv.weight"], second["conv.weight"])
    assert not torch.equal(first["conv.weight"], before["conv.weight"])


def test_fresh_network_factory_errors_and_warnings():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="Expected `Bare` to have submodules with `reset_param"):
        fresh_network_factory(Bare())

    class Mixed(Bare):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

    with pytest.warns(UserWarning, match=r"1 parameters \(w\) belong to modules without"):
        fresh_network_factory(Mixed())


def test_input_gradient_energy_matches_jacrev():
    net = TinyCNN(outputs=3).double().eval()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(36, 36, dtype=torch.float64)).Q.T[:5].reshape(5, 1, 6, 6)
    energy, total = input_gradient_energy(net, x, u, chunk_size=4)
    jac = torch.stack([jacrev(lambda xi: net(xi[None])[0])(xi).reshape(3, 36) for xi in x])
    proj = torch.einsum("nci,ki->nkc", jac, u.reshape(5, 36))
    torch.testing.assert_close(energy, proj.square().sum(-1).mean(0))
    torch.testing.assert_close(total, jac.square().sum((1, 2)).mean())
    assert all(p.grad is None for p in net.parameters())


def test_progress_bar_goes_to_stderr(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neural_anisotropy_directions(
            TinyCNN, (1, 6, 6), num_networks=3, progress=True, generator=torch.Generator()
        )
    assert "3/3" in capsys.readouterr().err
