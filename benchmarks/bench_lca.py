"""Cost of Loss Change Allocation per instrumented step, in one process.

Trains an MLP with SGD+momentum by hand; around each step it times (median of interleaved
repeats):

- one plain gradient evaluation on the LCA set (the reference, ``probe_loss_and_grad``),
- one training step (forward/backward/update on a mini-batch),
- LCA of the step: ``simpson`` in steady state (the gradient at θ_t reused from the previous
  step, as the callback does for consecutive steps), ``simpson`` cold, ``first_order`` in
  steady state, and ``adaptive`` (its mean splits are reported).

Target (issue 4): Simpson in steady state at most 2.3× one gradient evaluation (the limit is
2.0: a midpoint and an endpoint gradient). Peak memory is measured separately on a wider model
(RSS sampled while glibc returns every large block to the OS), in copies of the parameters,
together with the number of parameter-sized buffers alive (counted by storage).

    .venv/bin/python benchmarks/bench_lca.py [--steps 12] [--lca-size 2048]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.lca import loss_change_allocation, model_loss_and_grad


def mlp(width: int, depth: int = 3, d_in: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def data(n: int, seed: int = 0, d_in: int = 64) -> ProbeSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :10].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % 10
    return ProbeSet(x, y)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, data: ProbeSet, idx: torch.Tensor
) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(data.inputs[idx]), data.targets[idx]).backward()
    opt.step()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = mlp(args.width).eval()
    lca_set, train_set = data(args.lca_size), data(4096, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grad_fn = model_loss_and_grad(model, lca_set, chunk_size=args.chunk_size)
    n_params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {
        k: [] for k in ("grad", "train", "simpson", "simpson_cold", "first_order", "adaptive")
    }
    splits: list[int] = []
    start = grad_fn(snapshot(model))  # the kept gradient at θ_0
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, len(train_set), (args.batch_size,), generator=g)
        before = snapshot(model)
        t, _ = timed(partial(train_step, model, opt, train_set, idx))
        times["train"].append(t)
        after = {k: v.detach() for k, v in model.named_parameters()}
        # interleaved on the same step: the reference, then each method
        times["grad"].append(timed(partial(grad_fn, dict(after)))[0])
        for method in ("simpson", "simpson_cold", "first_order", "adaptive"):
            kept = None if method == "simpson_cold" else (start[0], clone(start[1]))
            run = partial(
                loss_change_allocation,
                None,
                before,
                after,
                method=method.removesuffix("_cold"),  # type: ignore[arg-type]
                loss_and_grad=grad_fn,
                start=kept,
            )
            del kept  # handed over: the call may use it as workspace
            t, res = timed(run)
            del run
            times[method].append(t)
            if method == "adaptive":
                splits.append(res.splits)
            if method == "simpson":
                next_start = (res.loss_after, res.grad_after)
        start = next_start
    ref = statistics.median(times["grad"])
    train = statistics.median(times["train"])
    print(
        f"\nSpeed: MLP width {args.width} ({n_params / 1e6:.2f} M parameters), LCA set "
        f"{args.lca_size} samples in chunks of {args.chunk_size}, training batch "
        f"{args.batch_size}, {args.steps} steps (median, interleaved), "
        f"{torch.get_num_threads()} threads\n"
    )
    print(f"{'what':34s} {'ms':>9s} {'× grad eval':>12s} {'× train step':>13s}  target")
    rows = [
        ("plain gradient on the LCA set", "grad", ""),
        ("training step", "train", ""),
        ("LCA simpson, steady state (2 evals)", "simpson", "<= 2.3x grad"),
        ("LCA simpson, cold (3 evals)", "simpson_cold", ""),
        ("LCA first_order, steady (1 eval)", "first_order", ""),
        ("LCA adaptive (tol 1e-3), steady", "adaptive", ""),
    ]
    for label, key, target in rows:
        m = statistics.median(times[key])
        met = ""
        if target:
            met = "  met" if m / ref <= 2.3 else "  NOT met"
        print(f"{label:34s} {m * 1e3:9.2f} {m / ref:12.2f} {m / train:13.2f}  {target}{met}")
    print(
        f"adaptive: mean splits {statistics.mean(splits):.2f} (min {min(splits)}, max "
        f"{max(splits)}); 2 splits = the paper's RK4"
    )


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` over a ``with`` block, in bytes."""

    def __init__(self, interval: float = 1e-4) -> None:
        self.interval = interval
        self.page = 4096
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


class BufferCount:
    """Parameter-sized buffers alive at every forward pass (a forward pre-hook), by storage.

    Every live tensor the garbage collector sees (and every leaf's ``.grad``) with the element
    count of one marker parameter (a shape no activation has) is a copy of that parameter;
    storages in ``exclude()`` (the model's own weights, the caller's θ_t snapshot) are not
    counted. Independent of the allocator: counts what LCA keeps, not transients.
    """

    def __init__(self, numel: int, exclude: Callable[[], set[int]]) -> None:
        self.numel = numel
        self.exclude = exclude
        self.peak = 0

    def __call__(self, module: nn.Module, args: Any) -> None:
        tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter)]
        tensors += [t.grad for t in tensors if t.is_leaf and t.grad is not None]
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if t.numel() == self.numel}
        self.peak = max(self.peak, len(ptrs - self.exclude()))


def callback_footprint(
    grad_fn: Callable[..., Any],
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    method: str,
    **kwargs: Any,
) -> None:
    """What the callback holds in a window of consecutive steps, and one allocation.

    θ_t (its own copy), the kept gradient (handed over as ``start``), the cumulative LC, and
    the allocation; the per-step LC is added into the cumulative one as the callback does.
    """
    kept = grad_fn(dict(before))
    theta_t = {k: v.clone() for k, v in before.items()}
    cumulative = {k: torch.zeros_like(v) for k, v in before.items()}
    res = loss_change_allocation(
        None, theta_t, after, method=method, loss_and_grad=grad_fn, start=kept, **kwargs
    )  # type: ignore[arg-type]
    del kept
    for k, v in res.lc.items():
        cumulative[k] += v
    del res, theta_t, cumulative


def memory(args: argparse.Namespace) -> None:
    try:  # return every block >= 64 KiB to the OS at once, so RSS tracks live tensors
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except OSError:
        print("\n(glibc not found: memory figures are upper bounds)")
    torch.manual_seed(0)
    model = mlp(args.mem_width, depth=8).eval()  # many layers: per-tensor temporaries are small
    lca_set = data(64)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    grad_fn = model_loss_and_grad(model, lca_set)
    before = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3)
    after = {k: v.detach() for k, v in model.named_parameters()}
    marker = list(model.parameters())[-2]  # the output layer's weight: no activation is as big
    own = {marker.data_ptr(), before[list(before)[-2]].data_ptr()}
    cases: dict[str, tuple[str, dict[str, Any]]] = {
        "LCA simpson": ("simpson", {}),
        "LCA adaptive (tol 1e-3)": ("adaptive", {}),
        # not the workload: forced to refine (8 splits), to show adaptive's worst peak
        "LCA adaptive, refining to 8 splits": ("adaptive", {"tolerance": 1e-30, "max_splits": 8}),
    }
    rss: dict[str, float] = {}
    buffers: dict[str, int] = {}
    for _ in range(2):  # second round: allocator and autograd warmed up
        with PeakRSS() as m:
            _ = grad_fn(dict(after))
            del _
        rss["plain gradient evaluation"] = (m.peak - m.base) / nbytes
        for label, (method, kwargs) in cases.items():
            with PeakRSS() as m:
                callback_footprint(grad_fn, before, after, method, **kwargs)
            rss[label] = (m.peak - m.base) / nbytes
    for label, (method, kwargs) in cases.items():  # counted apart: the scans take time
        count = BufferCount(marker.numel(), lambda: own)
        handle = model.register_forward_pre_hook(count)
        try:
            callback_footprint(grad_fn, before, after, method, **kwargs)
        finally:
            handle.remove()
        buffers[label] = count.peak
    print(
        f"\nPeak memory above the model and its inputs, in copies of the parameters "
        f"({nbytes / 2**20:.0f} MiB each; width {args.mem_width}, LCA set of 64 in one chunk); "
        f"target: LCA adds <= 4\n"
    )
    print(f"{'all the callback holds':38s} {'buffers':>8s} {'RSS':>7s}  target")
    for label, copies in rss.items():
        count = "-" if label.startswith("plain") else str(buffers[label])
        target = ""
        if label == "LCA simpson":
            target = "<= 4 copies: " + ("met" if buffers[label] <= 4 else "NOT met")
            target += f" (RSS {'<=' if copies <= 4 else '>'} 4)"
        print(f"{label:38s} {count:>8s} {copies:7.2f}  {target}")
    print(
        "buffers: parameter-sized tensors alive at the worst evaluation (counted by storage). "
        "Simpson: θ_t + cumulative LC (the callback's state) + the accumulator Σ c_j g_j (the "
        "kept gradient at θ_t, reused in place; autograd adds each new gradient straight into "
        "it) + one evaluation point, rebuilt in place; at θ_{t+1} the point is the live model "
        "and the kept gradient takes its place. Adaptive adds the odd-point accumulator, and "
        "while it refines the kept end gradient sits next to the point. RSS above the buffers: "
        "transients of one gradient evaluation (the chunk's activations and one layer's "
        "gradient before it is added in place)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--lca-size", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mem-width", type=int, default=1024)
    args = parser.parse_args()
    speed(args)
    memory(args)


if __name__ == "__main__":
    main()
