"""Benchmark: per-layer tangent kernels vs the naive vmap(jacrev) reference and nngeometry.

    .venv/bin/python benchmarks/bench_kernels.py [--quick] [--repeats 3]

Targets (issue 3): MLP 784-512-512-10, n=256, o=10, all three layers: >= 100x faster than the
naive reference (per-sample Jacobians with ``vmap(jacrev)``, then J J^T) and >= 5x faster than
nngeometry's ``GramMatrix`` per layer, with >= 10x less peak memory than the naive reference;
a small CIFAR-shaped CNN (4 conv layers): >= 3x faster than both. Timings are medians of
interleaved repeats; peak memory is the process's peak RSS increase (Linux ``VmHWM``, reset
before each measurement through ``/proc/self/clear_refs``). nngeometry is optional: install it
into the environment for the benchmark only (``pip install --no-deps nngeometry``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from lightning_probes.core.kernels import layer_tangent_kernels


def naive_kernels(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        own = {f"{name}.{k}": v.detach() for k, v in modules[name].named_parameters(recurse=False)}

        def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
            return functional_call(model, {**params, **p}, (xi.unsqueeze(0),))[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(own, x)
        n, o = x.shape[0], next(iter(jac.values())).shape[1]
        J = torch.cat([j.reshape(n, o, -1) for j in jac.values()], -1).reshape(n * o, -1)
        del jac
        out[name] = J @ J.T
        del J
    return out


def nngeometry_kernels(
    model: nn.Module, x: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor] | None:
    try:
        from nngeometry.gram import GramMatrix
        from nngeometry.layercollection import LayerCollection
    except ImportError:
        return None
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(len(x))), batch_size=len(x)
    )
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        lc = LayerCollection()
        lc.add_layer_from_model(model, modules[name])
        gram = GramMatrix(model, loader, function=lambda inp, _: model(inp), layer_collection=lc)
        g = gram.data  # [o, n, o, n]
        o, n = g.shape[:2]
        out[name] = g.permute(1, 0, 3, 2).reshape(n * o, n * o)
    return out


def _vm(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return float(line.split()[1]) / 1024
    return float("nan")


def _child_peak(case: str, key: str, n: int, queue: mp.Queue) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, x, names = CASES[case](n)
    fn = {"ours": lambda: layer_tangent_kernels(model, x, layers=names),
          "naive": lambda: naive_kernels(model, x, names),
          "nngeometry": lambda: nngeometry_kernels(model, x, names)}[key]  # fmt: skip
    base = _vm("VmRSS")
    fn()
    queue.put(_vm("VmHWM") - base)


def peak_memory_mb(case: str, key: str, n: int) -> float:
    """Peak RSS increase of one call in a fresh process (allocator caches cannot hide it)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child_peak, args=(case, key, n, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return float(value)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    ).eval()


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip


CASES: dict[str, Callable[[int], tuple[nn.Module, torch.Tensor, list[str]]]] = {
    "mlp": lambda n: (mlp(), torch.randn(n, 784), ["1", "3", "5"]),
    "cnn": lambda n: (cnn(), torch.randn(n, 3, 32, 32), ["0", "2", "4", "6"]),
}


def run_case(title: str, case: str, n: int, repeats: int, naive_repeats: int,
             targets: dict[str, float]) -> None:  # fmt: skip
    torch.manual_seed(0)
    model, x, names = CASES[case](n)
    ours = layer_tangent_kernels(model, x, layers=names)
    ref = naive_kernels(model, x, names)
    ng = nngeometry_kernels(model, x, names)
    for name in names:  # same numbers before timing anything
        scale = ref[name].abs().max()
        assert (ours[name] - ref[name]).abs().max() <= 1e-3 * scale, name
        if ng is not None:
            assert (ng[name] - ref[name]).abs().max() <= 1e-3 * scale, name
    del ours, ref, ng
    times: dict[str, list[float]] = {"ours": [], "naive": [], "nngeometry": []}
    peaks: dict[str, list[float]] = {"ours": [], "naive": [], "nngeometry": []}
    for r in range(repeats):  # interleaved: noise from other processes hits all methods alike
        for key, fn in (
            ("ours", lambda: layer_tangent_kernels(model, x, layers=names)),
            ("naive", lambda: naive_kernels(model, x, names)),
            ("nngeometry", lambda: nngeometry_kernels(model, x, names)),
        ):
            if key == "naive" and r >= naive_repeats:
                continue
            if key == "nngeometry" and ng_missing:
                continue
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    for key in times:
        if times[key]:
            peaks[key].append(peak_memory_mb(case, key, x.shape[0]))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    mem = {k: statistics.median(v) for k, v in peaks.items() if v}
    print(f"\n{title}  (n={x.shape[0]}, o=10, layers={names})")
    print(f"{'method':<12}{'time [s]':>10}{'peak RSS [MB]':>15}{'speed-up':>10}{'target':>8}")
    for key in ("ours", "naive", "nngeometry"):
        if key not in med:
            print(f"{key:<12}{'not installed':>25}")
            continue
        ratio = med[key] / med["ours"]
        target = targets.get(key)
        mark = (
            ""
            if target is None
            else (f"{target:.0f}x " + ("met" if ratio >= target else "NOT met"))
        )
        print(f"{key:<12}{med[key]:>10.3f}{mem[key]:>15.0f}{ratio:>9.1f}x  {mark}")
    if "naive" in mem and mem["ours"] > 0:
        ratio = mem["naive"] / mem["ours"]
        goal = targets.get("memory")
        note = (
            ""
            if goal is None
            else f" (target {goal:.0f}x: {'met' if ratio >= goal else 'NOT met'})"
        )
        print(f"peak memory, naive / ours: {ratio:.1f}x{note}")


ng_missing = False


def main() -> None:
    global ng_missing
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small n, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="mlp,cnn", help="comma-separated: mlp, cnn")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    try:
        import nngeometry  # noqa: F401
    except ImportError:
        ng_missing = True
        print("nngeometry not installed: `pip install --no-deps nngeometry` to compare.")
    torch.manual_seed(0)
    n_mlp = 64 if args.quick else 256
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "mlp" in cases:
        run_case(
            "MLP 784-512-512-10", "mlp", n_mlp, repeats, naive_repeats=1,
            targets={"naive": 100, "nngeometry": 5, "memory": 10},
        )  # fmt: skip
    if "cnn" in cases:
        run_case(
            "CIFAR-shaped CNN, 4 conv layers", "cnn", 16 if args.quick else 64, repeats,
            naive_repeats=repeats, targets={"naive": 3, "nngeometry": 3},
        )  # fmt: skip


if __name__ == "__main__":
    main()
