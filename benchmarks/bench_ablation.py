"""Benchmark: vectorised cumulative ablation curve vs the naive loop (one forward per mask).

Full curve, 10 orderings x 20 points, same model and probe set, on CPU (and on GPU if one is
available). Targets (issue 5): >= 3x for an MLP with both hidden layers ablated, >= 10x for a
CNN with its last three conv layers ablated (the paper's 11-layer CIFAR-10 ConvNet, appendix A.2,
at 1/8 and 1/4 of its width on CPU). Reference and fast runs are interleaved and the
median is reported (the machine may be shared); CPU times are process CPU times.
Run: ``python benchmarks/bench_ablation.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_probes.core.ablation import ablation_curve
from lightning_probes.core.interventions import trace_model
from lightning_probes.functional.ablation import ablation_counts, cumulative_keep_masks


def mlp() -> nn.Module:
    """The paper's 2-hidden-layer MNIST MLP shape (784-512-512-10)."""
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def cnn(width: int = 8) -> nn.Module:
    """The paper's 11-layer CIFAR-10 ConvNet (appendix A.2), channels divided by 64/width."""
    channels = [width * m for m in (1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8)]
    strides = [1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1]
    layers: list[nn.Module] = []
    c_in = 3
    for c, s in zip(channels, strides):
        layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers)


def naive_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, orderings, counts) -> None:
    """One full forward per (ordering, point), units zeroed by a hook on each ReLU."""
    trace = trace_model(model, x, None, True)
    points, sizes = trace.points, [p.num_units for p in trace.points]
    keep = cumulative_keep_masks(orderings, counts).flatten(0, 1)
    for row in keep:
        masks = row.split(sizes)
        handles = []
        for p, mask in zip(points, masks):

            def hook(mod, args, out, mask=mask):
                view = [1] * out.ndim
                view[1 if out.ndim > 2 else -1] = -1
                return out * mask.to(out.device, out.dtype).view(view)

            handles.append(p.module.register_forward_hook(hook))
        with torch.no_grad():
            (model(x).argmax(-1) == y).double().mean()
        for handle in handles:
            handle.remove()


def timed(fn: Callable[[], None], device: str) -> float:
    """GPU: wall time (synchronised). CPU: this process's CPU time, which is less distorted
    than wall time when other processes share the cores."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def bench(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: float) -> str:
    model = model.eval().to(x.device)
    fractions = torch.linspace(0, 1, 20)
    gen = torch.Generator().manual_seed(0)
    units = sum(p.num_units for p in trace_model(model, x, None, True).points)
    orderings = torch.stack([torch.randperm(units, generator=gen) for _ in range(10)])
    counts = ablation_counts(fractions, units)
    with torch.no_grad():

        def fast() -> None:
            ablation_curve(model, x, y, layers=None, num_orderings=10, fractions=fractions)

        def slow() -> None:
            naive_curve(model, x, y, orderings, counts)

        fast()  # warm-up
        ref_times, fast_times = [], []
        for _ in range(3):
            ref_times.append(timed(slow, x.device.type))
            fast_times.append(timed(fast, x.device.type))
    ref, vec = statistics.median(ref_times), statistics.median(fast_times)
    ratio = ref / vec
    verdict = "met" if ratio >= target else "NOT met"
    return (
        f"| {name:<34} | {x.device.type:<4} | {ref:8.3f} s | {vec:8.3f} s | {ratio:6.1f}x "
        f"| >= {target:.0f}x {verdict:<7} |"
    )


def main() -> None:
    # One intra-op thread: with other jobs on the cores, multi-threaded CPU timings of many
    # small ops are dominated by OpenMP spin-waiting; single-thread ratios are reproducible.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", file=sys.stderr)
    print("| case (10 orderings x 20 points)     | dev  | naive loop | vectorised | ratio  "
          "| target           |")  # fmt: skip
    print("|" + "-" * 36 + "|------|------------|------------|--------|------------------|")
    for device in devices:
        n = 512
        x, y = torch.randn(n, 784, device=device), torch.randint(0, 10, (n,), device=device)
        print(bench("MLP 784-512-512-10, n=512", mlp(), x, y, 3.0), flush=True)
        # the paper's CIFAR-10 ConvNet at 1/8 and 1/4 of its width (8-64, 16-128 channels)
        cases = [(8, 64), (16, 128)] if device == "cpu" else [(16, 512), (64, 256)]
        for width, n in cases:
            x = torch.randn(n, 3, 32, 32, device=device)
            y = torch.randint(0, 10, (n,), device=device)
            name = f"11-layer CNN (width/{64 // width}), n={n}"
            print(bench(name, cnn(width), x, y, 10.0), flush=True)


if __name__ == "__main__":
    main()
