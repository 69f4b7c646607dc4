"""Benchmark: loss plane evaluated in batched form (vmap over stacked parameters) vs a loop.

The reference evaluates the plane one point at a time: build the point's parameter dict and
call :func:`~lightning_probes.core.evaluation.probe_loss` (one ``functional_call`` per point,
the naive way). The batched form is :func:`~lightning_probes.core.landscape.loss_plane`
(``vmap`` over ``functional_call`` with stacked parameters, grouped to a memory budget).
Target (issue 7): at least 5x faster on CPU. Reference and fast runs are interleaved and the
median is reported (the machine may be shared). Run: ``python benchmarks/bench_landscape.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import probe_loss
from lightning_probes.core.landscape import loss_plane, random_direction, trainable_parameters

TARGET = 5.0


def mlp(d_in: int, hidden: tuple[int, ...], classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU()]
        d_in = h
    return nn.Sequential(*layers, nn.Linear(d_in, classes))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def loop_plane(model: nn.Module, data: ProbeSet, center, u, v, resolution: int) -> torch.Tensor:
    grid = torch.linspace(-1.0, 1.0, resolution)
    out = torch.empty(resolution, resolution)
    with torch.no_grad():
        for i, b in enumerate(grid):
            for j, a in enumerate(grid):
                point = {k: center[k] + a * u[k] + b * v[k] for k in center}
                out[i, j] = probe_loss(model, data, point)
    return out


def case(
    name: str, model: nn.Module, inputs: torch.Tensor, resolution: int, repeats: int
) -> tuple[str, float, float, float]:
    torch.manual_seed(0)
    model = model.eval()
    data = ProbeSet(inputs, torch.randint(0, 10, (len(inputs),)))
    center = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    u, v = random_direction(center, generator=gen), random_direction(center, generator=gen)

    def fast() -> torch.Tensor:
        return loss_plane(model, data, center, u, v, resolution=resolution).losses

    def ref() -> torch.Tensor:
        return loop_plane(model, data, center, u, v, resolution)

    torch.testing.assert_close(fast().float(), ref(), rtol=1e-4, atol=1e-5)  # same numbers
    times: dict[str, list[float]] = {"ref": [], "fast": []}
    runs: dict[str, Callable[[], torch.Tensor]] = {"ref": ref, "fast": fast}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    t_ref, t_fast = statistics.median(times["ref"]), statistics.median(times["fast"])
    return name, t_ref, t_fast, t_ref / t_fast


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(1)
    cases = [
        (
            "MLP 64-128-64-10, n=256, 11x11",
            mlp(64, (128, 64)),
            torch.rand(256, 64, generator=gen),
            11,
        ),
        (
            "MLP 64-128-64-10, n=256, 21x21",
            mlp(64, (128, 64)),
            torch.rand(256, 64, generator=gen),
            21,
        ),
        (
            "MLP 784-256-256-10, n=512, 11x11",
            mlp(784, (256, 256)),
            torch.rand(512, 784, generator=gen),
            11,
        ),
        ("CNN 1x16x16, n=256, 11x11", small_cnn(), torch.rand(256, 1, 16, 16, generator=gen), 11),
    ]
    print(f"{'case':36s} {'loop [s]':>9s} {'vmap [s]':>9s} {'ratio':>7s}  target >= {TARGET:.0f}x")
    for name, model, inputs, res in cases:
        label, t_ref, t_fast, ratio = case(name, model, inputs, res, repeats=5)
        status = "met" if ratio >= TARGET else "NOT met"
        print(f"{label:36s} {t_ref:9.3f} {t_fast:9.3f} {ratio:6.1f}x  {status}")


if __name__ == "__main__":
    main()
