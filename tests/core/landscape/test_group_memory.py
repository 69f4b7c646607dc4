"""Landscape planes on the ``vmap`` path: one group's parameters at a time, same losses."""

from __future__ import annotations

import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import probe_loss
from lightning_probes.core.landscape import loss_along_path, loss_plane, random_direction
from lightning_probes.core.landscape import planes as planes_module


def _setup() -> tuple[nn.Module, ProbeSet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double().eval()
    gen = torch.Generator().manual_seed(1)
    data = ProbeSet(
        torch.randn(12, 5, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (12,), generator=gen),
    )
    return net, data, {k: p.detach() for k, p in net.named_parameters()}


def test_plane_groups_hold_a_bounded_number_of_points(monkeypatch):
    net, data, center = _setup()
    gen = torch.Generator().manual_seed(2)
    u, v = (random_direction(center, generator=gen) for _ in "uv")
    built: list[int] = []  # points whose parameters exist at once
    combine = planes_module.combine

    def recording(c, dirs, coefs):  # type: ignore[no-untyped-def]
        built.append(coefs.shape[0])
        return combine(c, dirs, coefs)

    monkeypatch.setattr(planes_module, "combine", recording)
    plane = loss_plane(net, data, center, u, v, resolution=5, structured=False, points_per_call=4)
    assert sum(built) == 25 and max(built) == 4  # not all 25 points' parameters at once
    built.clear()
    tiny = loss_plane(
        net, data, center, u, v, resolution=5, structured=False, memory_budget_mb=1e-4
    )
    assert built == [1] * 25  # the budget admits one point per group
    # against the loss evaluated point by point (float64)
    for i, b in enumerate(plane.betas.tolist()):
        for j, a in enumerate(plane.alphas.tolist()):
            point = {k: center[k] + a * u[k] + b * v[k] for k in center}
            expected = probe_loss(net, data, point)
            torch.testing.assert_close(plane.losses[i, j], expected.cpu(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tiny.losses, plane.losses, rtol=1e-12, atol=1e-14)


def test_path_groups_hold_a_bounded_number_of_points(monkeypatch):
    net, data, a = _setup()
    b = {k: v + 0.1 for k, v in a.items()}
    built: list[int] = []
    combine = planes_module.combine
    monkeypatch.setattr(
        planes_module, "combine", lambda c, d, co: built.append(co.shape[0]) or combine(c, d, co)
    )
    t, losses = loss_along_path(net, data, [a, b], points_per_segment=7, structured=False,
                                points_per_call=3)  # fmt: skip
    assert built == [3, 3, 1]
    for ti, loss in zip(t.tolist(), losses):
        point = {k: (1 - ti) * a[k] + ti * b[k] for k in a}
        torch.testing.assert_close(loss, probe_loss(net, data, point), rtol=1e-10, atol=1e-12)
