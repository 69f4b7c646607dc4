"""Benchmark: the two exact routes to a conv layer's tangent kernel, on ResNet-18's widest layer.

For the ResNet-18's ``layer4`` convs of ``bench_real_models.py`` (width 8: n = 256 samples,
o = 10 outputs, t = 16 output positions, k = 576 patch features, m = 64 channels, P = 36,864)
this times the library's two routes (``lightning_probes.core.kernels.factors``) on the same
random factors:

- ``jacobian``: per-sample gradients ``J`` formed, then the blockwise symmetric ``self_gram``,
  ``(n·o)² · P`` multiply-adds;
- ``gram``: the forward Gram of the positions contracted with the output gradients in tiles,
  ``n²t(t·k + t·o·m + o²·m)`` multiply-adds (about 9x fewer here), whose contractions over
  positions have an inner dimension of only t = 16;

and checks that they agree (float32, relative 1e-5). "GF/s" counts each route's full
multiply-adds twice (both compute each off-diagonal block once, about half of them, so the
figures can exceed the matmul rate); "at matmul rate" is what those flops would take at the
1024² matmul's rate; "slowdown" is the time per multiply-add relative to ``jacobian``'s, which
``factors.GRAM_SLOWDOWN`` (4) bounds from above when it chooses a route.
Run: ``python benchmarks/bench_conv_routes.py [--threads 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_probes.core.kernels.factors import AffineFactors, full_kernel

N, T, K, OUT, M = 256, 16, 576, 10, 64


def timed(fn: Callable[[], Tensor], repeats: int) -> tuple[float, Tensor]:
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    a, d = torch.randn(N, T, K), torch.randn(OUT, N, T, M)
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rate, _ = timed(lambda: x @ y, 5)
    rate = 2 * 1024**3 / rate
    macs = {
        "jacobian": float(N * OUT) ** 2 * K * M,
        "gram": float(N) ** 2 * T * (T * K + T * OUT * M + OUT**2 * M),
    }
    routes: dict[str, Callable[[], Tensor]] = {
        "jacobian": lambda: full_kernel(
            AffineFactors(a[:, :, None], d[:, :, :, None], False, "jacobian")
        ),
        "gram": lambda: full_kernel(AffineFactors(a[:, :, None], d[:, :, :, None], False, "gram")),
    }
    print(f"torch {torch.__version__}, {args.threads} threads; 1024² matmul {rate / 1e9:.0f} GF/s")
    print(f"layer: n={N} o={OUT} t={T} k={K} m={M} (P={K * M}); medians of {args.repeats}")
    print(f"{'route':<10}{'s':>8}{'G mult-adds':>13}{'GF/s':>8}{'at matmul rate s':>18}"
          f"{'slowdown':>10}")  # fmt: skip
    kernels, seconds = {}, {}
    for name, fn in routes.items():
        seconds[name], kernels[name] = timed(fn, args.repeats)
        per_mac = seconds[name] / macs[name] / (seconds["jacobian"] / macs["jacobian"])
        print(f"{name:<10}{seconds[name]:>8.2f}{macs[name] / 1e9:>13.1f}"
              f"{2 * macs[name] / seconds[name] / 1e9:>8.1f}{2 * macs[name] / rate:>18.2f}"
              f"{per_mac:>10.2f}")  # fmt: skip
    err = float(
        (kernels["gram"] - kernels["jacobian"]).abs().max() / kernels["jacobian"].abs().max()
    )
    assert err < 1e-5, err
    print(f"the two kernels agree (max relative difference {err:.1e})")


if __name__ == "__main__":
    main()
