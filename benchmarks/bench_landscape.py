"""Benchmark: loss plane evaluated in batched form vs a per-point loop.

The reference evaluates the plane one point at a time: build the point's parameter dict and
call :func:`~lightning_probes.core.evaluation.probe_loss` (one ``functional_call`` per point,
the naive way). The batched form is :func:`~lightning_probes.core.landscape.loss_plane`: for a
chain of known layers its exact structured path (first moved layer computed once per
direction, per-point ``bmm`` after it, see ``core/landscape/affine.py``); the ``vmap`` column
is the generic fallback (``vmap`` over ``functional_call`` with stacked parameters).
Target (issue 7): at least 5x faster on CPU. Runs are interleaved and the median is reported
(the machine may be shared). ``flop ratio``: the loop's multiply-add FLOPs over the
structured path's (its speed-up if both ran their products at the same FLOP rate; the layers
after the first moved one must run once per point with that point's weights and inputs).
Run: ``python benchmarks/bench_landscape.py [--threads N]``.
"""

from __future__ import annotations

import argparse
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


def plane_flops(model: nn.Module, inputs: torch.Tensor, points: int) -> tuple[float, float]:
    """(loop, structured) multiply-add FLOPs of Linear/Conv layers for ``points`` points."""
    per_sample: list[float] = []

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        w = m.weight  # type: ignore[union-attr]
        per_sample.append(2.0 * out[0].numel() * w[0].numel())

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model(inputs[:1])
    for h in handles:
        h.remove()
    n = len(inputs)
    loop = points * n * sum(per_sample)
    structured = 3 * n * per_sample[0] + points * n * sum(per_sample[1:])
    return loop, structured


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
) -> tuple[str, dict[str, float], float]:
    torch.manual_seed(0)
    model = model.eval()
    data = ProbeSet(inputs, torch.randint(0, 10, (len(inputs),)))
    center = trainable_parameters(model)
    gen = torch.Generator().manual_seed(0)
    u, v = random_direction(center, generator=gen), random_direction(center, generator=gen)

    def fast() -> torch.Tensor:
        return loss_plane(model, data, center, u, v, resolution=resolution).losses

    def vmapped() -> torch.Tensor:
        plane = loss_plane(model, data, center, u, v, resolution=resolution, structured=False)
        return plane.losses

    def ref() -> torch.Tensor:
        return loop_plane(model, data, center, u, v, resolution)

    want = ref()
    for fn in (fast, vmapped):  # same numbers
        torch.testing.assert_close(fn().float(), want, rtol=1e-4, atol=1e-5)
    times: dict[str, list[float]] = {"ref": [], "fast": [], "vmap": []}
    runs: dict[str, Callable[[], torch.Tensor]] = {"ref": ref, "fast": fast, "vmap": vmapped}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    loop_flops, fast_flops = plane_flops(model, inputs, resolution**2)
    return name, {k: statistics.median(t) for k, t in times.items()}, loop_flops / fast_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    torch.set_num_threads(parser.parse_args().threads)
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
    print(
        f"{'case':34s} {'loop [s]':>9s} {'vmap [s]':>9s} {'fast [s]':>9s} {'vmap':>6s} "
        f"{'fast':>6s} {'flop ratio':>10s}  target >= {TARGET:.0f}x (fast)"
    )
    for name, model, inputs, res in cases:
        label, t, bound = case(name, model, inputs, res, repeats=5)
        ratio = t["ref"] / t["fast"]
        status = "met" if ratio >= TARGET else "NOT met"
        print(
            f"{label:34s} {t['ref']:9.3f} {t['vmap']:9.3f} {t['fast']:9.3f} "
            f"{t['ref'] / t['vmap']:5.1f}x {ratio:5.1f}x {bound:9.1f}x  {status}"
        )


if __name__ == "__main__":
    main()
