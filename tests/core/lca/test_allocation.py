"""LCA math: quadrature, allocation, adaptive doubling, summaries (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.lca import loss_change_allocation, model_loss_and_grad
from lightning_probes.functional.lca import (
    fraction_helped,
    layer_sums,
    per_neuron_lc,
    rebuild_loss_curve,
    relative_error,
    simpson_weights,
    weibull_fit,
)

f64 = torch.float64


def _quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(7, 7, generator=g, dtype=f64)
    a = m @ m.T + 0.1 * torch.eye(7, dtype=f64)  # symmetric positive definite: convex
    b = torch.randn(7, generator=g, dtype=f64)

    def flat(p):
        return torch.cat([p["w"].reshape(-1), p["b"]])

    def loss(p):
        x = flat(p)
        return 0.5 * x @ a @ x + b @ x

    before = {
        "w": torch.randn(2, 2, generator=g, dtype=f64),
        "b": torch.randn(3, generator=g, dtype=f64),
    }
    after = {k: v + 0.7 * torch.randn(v.shape, generator=g, dtype=f64) for k, v in before.items()}
    return a, b, flat, loss, before, after


@pytest.mark.parametrize("method", ["simpson", "adaptive"])
def test_quadratic_closed_form_simpson_is_exact(method):
    a, b, flat, loss, before, after = _quadratic()
    res = loss_change_allocation(loss, before, after, method=method)
    # closed form: LC = Δ ⊙ ∇L(midpoint) for a quadratic (the gradient is linear along the path)
    delta = flat(after) - flat(before)
    expected = delta * (a @ (flat(before) + delta / 2) + b)
    torch.testing.assert_close(flat(res.lc), expected, rtol=1e-12, atol=1e-12)
    assert res.lc["w"].shape == (2, 2) and res.lc["b"].shape == (3,)
    true = float(loss(after) - loss(before))
    assert res.true_delta == pytest.approx(true, rel=1e-12)
    assert res.total == pytest.approx(true, rel=1e-10) and res.error < 1e-10
    assert res.splits == 2  # exact at the first try: no doubling


def test_cubic_closed_form_and_fixed_splits():
    # Simpson is exact for cubics along the path; LC_i = c_i ((θ+Δ)^3 - θ^3) per coordinate
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=f64)
    before = {"x": torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=f64)}
    after = {"x": torch.tensor([-0.5, 0.4, 1.0, 1.1], dtype=f64)}
    for splits in (2, 4, 6):
        res = loss_change_allocation(
            lambda p: (c * p["x"] ** 3).sum(), before, after, method="simpson", splits=splits
        )
        expected = c * (after["x"] ** 3 - before["x"] ** 3)
        torch.testing.assert_close(res.lc["x"], expected, rtol=1e-12, atol=1e-12)
        assert res.splits == splits and res.grad_evals == splits + 1


def _net_problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 5, dtype=f64)
    y = torch.randint(0, 3, (40,))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    after = {k: v + 0.3 * torch.randn_like(v) for k, v in before.items()}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(net, p, (x,)), y)

    return net, ProbeSet(x, y), loss, before, after


def _reference_lc(loss, before, after, nodes=64):
    """Gauss-Legendre path integral with torch.func.grad (independent of Simpson)."""
    s, w = np.polynomial.legendre.leggauss(nodes)
    s, w = (s + 1) / 2, w / 2
    out = {k: torch.zeros_like(v) for k, v in before.items()}
    g = grad(loss)
    for si, wi in zip(s, w):
        gi = g({k: before[k] + float(si) * (after[k] - before[k]) for k in before})
        for k in out:
            out[k] += float(wi) * gi[k] * (after[k] - before[k])
    return out


def test_small_net_float64_simpson_and_adaptive_match_exact_integral():
    net, data, loss, before, after = _net_problem()
    ref = _reference_lc(loss, before, after)
    true = float(loss(after) - loss(before))
    assert sum(float(v.sum()) for v in ref.values()) == pytest.approx(true, rel=1e-10)
    simpson = loss_change_allocation(loss, before, after, method="simpson", splits=2)
    adaptive = loss_change_allocation(loss, before, after, method="adaptive", tolerance=1e-6)
    assert adaptive.error <= 1e-6 and adaptive.splits > 2
    for k in ref:
        torch.testing.assert_close(adaptive.lc[k], ref[k], rtol=0, atol=1e-6)
        # two splits: a few percent of the largest contribution on a step this large
        err = (simpson.lc[k] - ref[k]).abs().max() / ref[k].abs().max()
        assert err < 0.1
    assert adaptive.total == pytest.approx(true, abs=1e-6)
    assert abs(simpson.total - true) > adaptive.error  # doubling really improved it


def test_first_order_overestimates_the_decrease_on_a_convex_loss():
    # softmax regression: cross-entropy is convex in the weights
    torch.manual_seed(1)
    x, y = torch.randn(50, 4, dtype=f64), torch.randint(0, 3, (50,))

    def loss(p):
        return nn.functional.cross_entropy(x @ p["w"].T + p["b"], y)

    before = {"w": torch.randn(3, 4, dtype=f64), "b": torch.zeros(3, dtype=f64)}
    g = grad(loss)(before)
    for lr in (0.1, 0.5, 1.0):
        after = {k: before[k] - lr * g[k] for k in before}
        first = loss_change_allocation(loss, before, after, method="first_order")
        exact = loss_change_allocation(loss, before, after, method="adaptive", tolerance=1e-8)
        assert first.total < first.true_delta < 0  # predicts more decrease than happened
        assert exact.total == pytest.approx(exact.true_delta, abs=1e-8)
        assert first.splits == 1
        assert first.relative_error > exact.relative_error


def test_adaptive_reuses_every_gradient_when_doubling():
    net, data, loss, before, after = _net_problem(2)
    after = {k: before[k] + 5.0 * (after[k] - before[k]) for k in before}  # a big, curved step
    points: list[float] = []
    base = model_loss_and_grad(net, data)

    def counted(params):
        # the position along the segment, from one coordinate that moves
        k = "0.weight"
        s = (params[k] - before[k]).flatten()[0] / (after[k] - before[k]).flatten()[0]
        points.append(round(float(s), 9))
        return base(params)

    res = loss_change_allocation(None, before, after, loss_and_grad=counted, tolerance=1e-7)
    assert res.splits in (4, 8, 16, 32)
    assert len(points) == len(set(points)) == res.splits + 1 == res.grad_evals
    assert sorted(points) == [round(j / res.splits, 9) for j in range(res.splits + 1)]
    # the same splits as a fixed Simpson rule: identical allocation
    fixed = loss_change_allocation(loss, before, after, method="simpson", splits=res.splits)
    for k in before:
        torch.testing.assert_close(res.lc[k], fixed.lc[k], rtol=1e-9, atol=1e-12)


def test_adaptive_stops_at_max_splits_and_start_is_reused():
    net, data, loss, before, after = _net_problem(3)
    after = {k: before[k] + 20.0 * (after[k] - before[k]) for k in before}
    res = loss_change_allocation(loss, before, after, tolerance=1e-14, max_splits=8)
    assert res.splits == 8 and res.error > 1e-14
    start = model_loss_and_grad(net, data)(dict(before))
    again = loss_change_allocation(loss, before, after, tolerance=1e-14, max_splits=8, start=start)
    assert again.grad_evals == res.grad_evals - 1 == 8
    for k in before:
        torch.testing.assert_close(again.lc[k], res.lc[k], rtol=1e-12, atol=1e-14)
    # grad_after is the gradient at θ_{t+1}: the next step's start
    torch.testing.assert_close(res.grad_after, grad(loss)(after), rtol=1e-10, atol=1e-12)


def test_model_loss_and_grad_chunks_match_autograd_on_a_copy():
    net, data, loss, before, after = _net_problem(4)
    chunked = loss_change_allocation(
        None,
        before,
        after,
        method="simpson",
        loss_and_grad=model_loss_and_grad(net, data, chunk_size=7),
    )
    ref_net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    direct = {}
    for s, w in zip((0.0, 0.5, 1.0), (1 / 6, 4 / 6, 1 / 6)):
        ref_net.load_state_dict({k: before[k] + s * (after[k] - before[k]) for k in before})
        ref_net.zero_grad()
        nn.functional.cross_entropy(ref_net(data.inputs), data.targets).backward()
        for k, p in ref_net.named_parameters():
            direct[k] = direct.get(k, 0) + w * p.grad * (after[k] - before[k])
    for k in before:
        torch.testing.assert_close(chunked.lc[k], direct[k], rtol=1e-10, atol=1e-12)
        assert not torch.equal(dict(net.named_parameters())[k], after[k])  # never written


def test_nothing_moved_allocates_nothing():
    _, _, loss, before, _ = _net_problem()
    res = loss_change_allocation(loss, before, {k: v.clone() for k, v in before.items()})
    assert res.splits == 0 and res.total == 0.0 and res.true_delta == 0.0
    assert all(not v.any() for v in res.lc.values())


def test_float32_inputs_accumulate_in_float32_and_frozen_param_gets_zero():
    net, data, loss, before, after = _net_problem()
    after["0.bias"] = before["0.bias"].clone()  # a parameter that did not move
    res = loss_change_allocation(loss, before, after, method="simpson")
    assert not res.lc["0.bias"].any()
    b32 = {k: v.float() for k, v in before.items()}
    a32 = {k: v.float() for k, v in after.items()}
    net32 = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x32 = data.inputs.float()
    res32 = loss_change_allocation(
        lambda p: nn.functional.cross_entropy(functional_call(net32, p, (x32,)), data.targets),
        b32,
        a32,
        method="simpson",
    )
    assert res32.lc["0.weight"].dtype == torch.float32
    assert res32.total == pytest.approx(res.total, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "rk4"}, ValueError, "`method` can be 'first_order', 'simpson', 'adaptive'"),
        ({"splits": 3}, ValueError, "Expected `splits` to be an even int >= 2, got 3"),
        ({"tolerance": 0.0}, ValueError, "Expected `tolerance` to be a positive number"),
        ({"max_splits": 1}, ValueError, r"Expected `max_splits` to be an int >= `splits` \(2\)"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    _, _, loss, before, after = _net_problem()
    with pytest.raises(error, match=match):
        loss_change_allocation(loss, before, after, **kwargs)


def test_invalid_inputs():
    _, _, loss, before, after = _net_problem()
    with pytest.raises(ValueError, match="same names, got differences \\['0.bias'\\]"):
        loss_change_allocation(loss, before, {k: v for k, v in after.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="Expected `after\\['0.bias'\\]` to have shape \\(8,\\)"):
        loss_change_allocation(loss, before, {**after, "0.bias": torch.zeros(3, dtype=f64)})
    with pytest.raises(ValueError, match="to return a scalar tensor, got \\(40, 3\\)"):
        loss_change_allocation(lambda p: torch.zeros(40, 3), before, after)
    with pytest.raises(TypeError, match="Expected `loss_fn` to be a callable"):
        loss_change_allocation(None, before, after)
    with pytest.raises(ValueError, match="at least one parameter"):
        loss_change_allocation(loss, {}, {})


# ---------------------------------------------------------------------- functional summaries
def test_simpson_weights_integrate_cubics_exactly():
    for n in (2, 4, 8, 32):
        w = simpson_weights(n)
        s = np.linspace(0, 1, n + 1)
        for poly in ([1.0], [0, 1.0], [0, 0, 1.0], [2.0, -1.0, 0.5, 3.0]):
            exact = sum(c / (i + 1) for i, c in enumerate(poly))  # ∫_0^1 Σ c_i s^i
            assert float(w @ torch.tensor(np.polyval(poly[::-1], s))) == pytest.approx(exact)
    assert (simpson_weights(2) * 6).tolist() == [1.0, 4.0, 1.0]
    with pytest.raises(ValueError, match="even int >= 2, got 0"):
        simpson_weights(0)


def test_summaries_against_loops():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, 2), torch.randn(4)
    neurons = per_neuron_lc(w, b)
    for o in range(4):
        assert float(neurons[o]) == pytest.approx(
            sum(float(v) for v in w[o].flatten()) + float(b[o])
        )
    with pytest.raises(ValueError, match="Expected `bias_lc` to have shape \\(4,\\)"):
        per_neuron_lc(w, torch.zeros(3))
    values = [float(v) for v in torch.cat([w.flatten(), b])]
    assert fraction_helped([w, b]) == pytest.approx(sum(v < 0 for v in values) / len(values))
    assert np.isnan(fraction_helped(torch.zeros(0)))
    lc = torch.randn(10)
    curve = rebuild_loss_curve(2.5, lc)
    running = 2.5
    for t in range(10):
        running += float(lc[t])
        assert float(curve[t + 1]) == pytest.approx(running)
    sums = layer_sums({"a.w": w, "a.b": b, "c.w": lc}, {"a.w": "a", "a.b": "a", "c.w": "c"})
    assert sums["a"] == pytest.approx(sum(values)) and sums["c"] == pytest.approx(float(lc.sum()))
    assert relative_error(-0.9, -1.0) == pytest.approx(0.1)
    assert relative_error(0.0, 0.0) == 0.0 and relative_error(1.0, 0.0) == float("inf")


def test_weibull_fit_recovers_a_heavy_tailed_shape():
    rng = np.random.default_rng(0)
    for k in (0.53, 1.5):
        x = 1e-6 * rng.weibull(k, size=20_000) * np.where(rng.random(20_000) < 0.5, -1, 1)
        shape, scale = weibull_fit(torch.tensor(x))
        assert shape == pytest.approx(k, rel=0.05) and scale == pytest.approx(1e-6, rel=0.1)
    assert all(np.isnan(weibull_fit(torch.zeros(10))))
