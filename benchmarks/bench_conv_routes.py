"""Benchmark: the two exact routes to a conv layer's tangent kernel, on ResNet-18's widest layer.

``bench_real_models.py`` prices a conv layer's kernel at the cheaper route's flops (at the
1024 x 1024 matmul rate): per-sample gradients, ``(n·o)² · P`` (``J Jᵀ``), or the forward/
backward factors summed over position pairs. For the ResNet-18's ``layer4`` convs (width 8:
n = 256 samples, o = 10 outputs, t = 16 output positions, k = 576 patch features, m = 64
channels, P = 36,864) the factor route has fewer flops, but every contraction over positions
has an inner dimension of t = 16 and its intermediates are (n·t)²-sized: this prints, for one
such layer, the time and achieved rate of

- ``jacobian``: the library's per-sample-gradient route (``AffineFactors(method="jacobian")``:
  ``J`` formed, then the blockwise symmetric ``self_gram``), ``(n·o)² · P`` multiply-adds;
- ``gram``: the library's position-pair route (``method="gram"``), ``n²t²(k + o²(m + 1))``;
- ``blocked``: the cheapest order of the factor route we know, written here in plain torch
  (``F = A Aᵀ``, then per block of columns ``H = F Δ`` over positions and ``Δᵀ H``),
  ``(n·t)² k + n²t²·o·m + n²·t·o²·m`` multiply-adds;

all three on the same random factors, compared with each other (float32, relative 1e-5).
"GF/s" counts each route's full multiply-adds twice (the blockwise ``self_gram`` computes each
off-diagonal block of ``J Jᵀ`` once, about half of them, so its figure exceeds the matmul
rate); "at matmul rate" is what those flops would take at the 1024² matmul's rate.
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


def blocked(a: Tensor, d: Tensor, cols: int = 16) -> Tensor:
    """``K[(i,c),(j,d)] = Σ_pq (a_ip·a_jq)(δ_icp·δ_jdq)`` by the cheapest contraction order."""
    n, t, k = a.shape  # a [n, t, k], d [o, n, t, m]
    o, m = d.shape[0], d.shape[-1]
    f = (a.reshape(n * t, k) @ a.reshape(n * t, k).T).view(n, t, n, t)
    dq = d.permute(1, 2, 3, 0).contiguous()  # [j, q, m, d]
    dc = d.permute(1, 0, 2, 3).reshape(n, o, t * m)  # [i, c, (p m)]
    out = torch.empty(n, o, n, o)
    for j0 in range(0, n, cols):
        j1 = min(n, j0 + cols)
        s = j1 - j0
        fj = f[:, :, j0:j1].permute(2, 0, 1, 3).reshape(s, n * t, t)
        h = torch.bmm(fj, dq[j0:j1].reshape(s, t, m * o)).view(s, n, t * m, o)  # H[j,i,(p m),d]
        out[:, :, j0:j1] = torch.matmul(dc.unsqueeze(0), h).permute(1, 2, 0, 3)
    return out.view(n * o, n * o)


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
        "gram": float(N * T) ** 2 * (K + OUT**2 * (M + 1)),
        "blocked": float(N * T) ** 2 * K + float(N * T) ** 2 * OUT * M + N**2 * T * OUT**2 * M,
    }
    routes: dict[str, Callable[[], Tensor]] = {
        "jacobian": lambda: full_kernel(
            AffineFactors(a[:, :, None], d[:, :, :, None], False, "jacobian")
        ),
        "gram": lambda: full_kernel(AffineFactors(a[:, :, None], d[:, :, :, None], False, "gram")),
        "blocked": lambda: blocked(a, d),
    }
    print(f"torch {torch.__version__}, {args.threads} threads; 1024² matmul {rate / 1e9:.0f} GF/s")
    print(f"layer: n={N} o={OUT} t={T} k={K} m={M} (P={K * M}); medians of {args.repeats}")
    print(f"{'route':<10}{'s':>8}{'G mult-adds':>13}{'GF/s':>8}{'at matmul rate s':>18}")
    kernels = {}
    for name, fn in routes.items():
        seconds, kernels[name] = timed(fn, args.repeats)
        print(f"{name:<10}{seconds:>8.2f}{macs[name] / 1e9:>13.1f}"
              f"{2 * macs[name] / seconds / 1e9:>8.1f}{2 * macs[name] / rate:>18.2f}")  # fmt: skip
    ref = kernels["jacobian"]
    for name, k in kernels.items():
        err = float((k - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, (name, err)
    print("the three kernels agree (max relative difference < 1e-5)")


if __name__ == "__main__":
    main()
