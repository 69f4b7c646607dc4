"""Blockwise Gram ``self_gram(J)`` vs the plain product ``J @ J.T``, in one process.

Two views, medians of interleaved repeats:

- the product alone, on the per-sample-gradient matrices ``J`` (``[n·o, P]``) of the four conv
  layers of the CIFAR-shaped CNN in ``bench_kernels.py`` (n=64, o=10) and on the backward
  kernel factor of its MLP's 512-wide layers (n=256, o=10: ``[2560, 512]``);
- the whole ``layer_tangent_kernels`` call on both ``bench_kernels.py`` models, with
  ``self_gram`` swapped back to ``J @ J.T`` for the reference column.

The blockwise form computes each off-diagonal block once (5/8 of the multiply-adds at 640
rows, 1/2 + 1/2^(d+1) with d splits). Both columns give the same kernels up to rounding.

    .venv/bin/python benchmarks/bench_gram.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_kernels import CASES

from lightning_probes.core.kernels import factors as kernels_factors
from lightning_probes.core.kernels import layer_tangent_kernels
from lightning_probes.core.kernels import tangent as kernels
from lightning_probes.functional.linalg import self_gram


def plain(x: torch.Tensor, **_: int) -> torch.Tensor:
    return x @ x.T


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def swap(fn: Callable[..., torch.Tensor]) -> None:
    kernels_factors.self_gram = fn  # type: ignore[assignment]
    kernels.self_gram = fn  # type: ignore[assignment]


def bind(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    return lambda: fn(x)


def kernels_with(
    fn: Callable[..., torch.Tensor], model: torch.nn.Module, x: torch.Tensor, names: list[str]
) -> Callable[[], object]:
    """``layer_tangent_kernels`` on the model with ``fn`` as the kernels' Gram product."""

    def call() -> object:
        swap(fn)
        return layer_tangent_kernels(model, x, layers=names)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'product':34s} {'J @ J.T [ms]':>13s} {'self_gram [ms]':>15s} {'ratio':>6s}")
    gen = torch.Generator().manual_seed(0)
    shapes = [(640, 448), (640, 4640), (640, 9248), (640, 18496), (2560, 512)]
    for rows, cols in shapes:
        j = torch.randn(rows, cols, generator=gen)
        torch.testing.assert_close(self_gram(j), j @ j.T)
        t = interleaved({"plain": bind(plain, j), "gram": bind(self_gram, j)}, args.repeats)
        label = f"J [{rows}, {cols}]"
        print(f"{label:34s} {t['plain'] * 1e3:13.1f} {t['gram'] * 1e3:15.1f} "
              f"{t['plain'] / t['gram']:5.2f}x")  # fmt: skip
    print(f"\n{'layer_tangent_kernels':34s} {'J @ J.T [s]':>13s} {'self_gram [s]':>15s}")
    for case, n in (("mlp", 256), ("cnn", 64)):
        torch.manual_seed(0)
        model, x, names = CASES[case](n)

        runs = {
            key: kernels_with(fn, model, x, names)
            for key, fn in (("plain", plain), ("gram", self_gram))
        }
        t = interleaved(runs, args.repeats)
        swap(self_gram)
        label = f"{case} (bench_kernels.py, n={n})"
        print(f"{label:34s} {t['plain']:13.3f} {t['gram']:15.3f} "
              f"{t['plain'] / t['gram']:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
