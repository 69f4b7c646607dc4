"""Blockwise Gram ``self_gram(J)`` vs the plain product ``J @ J.T``, in one process.

Two views, medians of interleaved repeats:

- the product alone, on the per-sample-gradient matrices ``J`` (``[n·o, P]``) of the four conv
  layers of the CIFAR-shaped CNN in ``bench_kernels.py`` (n=64, o=10) and on the backward
  kernel factor of its MLP's 512-wide layers (n=256, o=10: ``[2560, 512]``);
- the whole ``layer_tangent_kernels`` call on both ``bench_kernels.py`` models, inside
  ``gram_leaf_rows(sys.maxsize)`` (every ``self_gram`` a plain ``J @ J.T``) for the reference
  column.

The blockwise form computes each off-diagonal block once (5/8 of the multiply-adds at 640
rows, 1/2 + 1/2^(d+1) with d splits). Both columns give the same kernels up to rounding.

    .venv/bin/python benchmarks/bench_gram.py [--repeats 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_kernels import CASES

from lightning_probes.core.kernels import layer_tangent_kernels
from lightning_probes.functional.linalg import LEAF_ROWS, gram_leaf_rows, self_gram

PLAIN = sys.maxsize  # leaf rows with which self_gram is the plain product J @ J.T


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


def gram(x: torch.Tensor, leaf_rows: int) -> Callable[[], object]:
    return lambda: self_gram(x, leaf_rows=leaf_rows)


def kernels_with(
    leaf_rows: int, model: torch.nn.Module, x: torch.Tensor, names: list[str]
) -> Callable[[], object]:
    """``layer_tangent_kernels`` on the model, its Gram products with ``leaf_rows``."""

    def call() -> object:
        with gram_leaf_rows(leaf_rows):
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
        t = interleaved({"plain": gram(j, PLAIN), "gram": gram(j, LEAF_ROWS)}, args.repeats)
        label = f"J [{rows}, {cols}]"
        print(f"{label:34s} {t['plain'] * 1e3:13.1f} {t['gram'] * 1e3:15.1f} "
              f"{t['plain'] / t['gram']:5.2f}x")  # fmt: skip
    print(f"\n{'layer_tangent_kernels':34s} {'J @ J.T [s]':>13s} {'self_gram [s]':>15s}")
    for case, n in (("mlp", 256), ("cnn", 64)):
        torch.manual_seed(0)
        model, x, names = CASES[case](n)

        runs = {
            key: kernels_with(rows, model, x, names)
            for key, rows in (("plain", PLAIN), ("gram", LEAF_ROWS))
        }
        t = interleaved(runs, args.repeats)
        label = f"{case} (bench_kernels.py, n={n})"
        print(f"{label:34s} {t['plain']:13.3f} {t['gram']:15.3f} "
              f"{t['plain'] / t['gram']:5.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
