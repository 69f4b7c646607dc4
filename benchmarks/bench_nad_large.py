"""NADs of a large input with the autograd method and the low-rank PCA: time and peak memory.

Issue 6 asks for the largest input handled within 16 GB with the low-rank path (goal:
3x224x224 with the autograd method). This computes the first ``k`` NADs of a LeNet-shaped CNN
on 3x224x224 inputs (d = 150,528) from ``--networks`` random initialisations, and prints the
wall time and the process's peak resident memory (``ru_maxrss``) against the 16 GB goal.

    .venv/bin/python benchmarks/bench_nad_large.py [--networks 1000] [--k 32] [--size 224]
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_probes.core.nad import neural_anisotropy_directions


def lenet(channels: int) -> nn.Module:
    """LeNet's layers, with an adaptive pool so any input size reaches the 16x5x5 head."""
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 1),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--networks", type=int, default=1000)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    shape = (3, args.size, args.size)
    d = math.prod(shape)
    net = lenet(3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    start = time.perf_counter()
    nads = neural_anisotropy_directions(
        _fresh(net),  # re-initialised by reset_parameters, under the seeded global RNG
        shape,
        num_networks=args.networks,
        method="autograd",
        k=args.k,
        svd="lowrank",
        generator=torch.Generator().manual_seed(0),
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gradients_gib = args.networks * d * 4 / 2**30
    print(f"NADs of a LeNet-shaped CNN, input {'x'.join(map(str, shape))} (d = {d:,}), CPU")
    print(f"networks {args.networks}, k = {args.k}, autograd gradients + randomized low-rank PCA")
    print(f"directions {tuple(nads.directions.shape)}, top singular values "
          f"{[round(float(s), 3) for s in nads.singular_values[:3]]}")  # fmt: skip
    print(f"wall time {seconds:.1f} s; gradient matrix {gradients_gib:.2f} GiB")
    verdict = "met" if peak <= 16 else "NOT met"
    print(f"peak RSS {peak:.2f} GiB (before: {before:.2f} GiB); goal <= 16 GB: {verdict}")


def _fresh(net: nn.Module) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        for module in net.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return net

    return factory


if __name__ == "__main__":
    main()
