"""Benchmark: NADs of LeNet (1x32x32, one output) vs the authors' procedure, on CPU.

Reference (the authors' ``GradientCovarianceAnisotropyFinder``): a Python loop over
networks, each evaluated on the batch of all ``d`` inputs ``x0 + 100 e_i`` and then all
``x0 - 100 e_i``, then scikit-learn's PCA. Ours: :func:`network_gradients` (cache-sized input
blocks; vmap over networks on GPU; LeNet's ``conv1 -> relu -> max_pool2d`` and the
``conv2 -> relu -> max_pool2d`` after it evaluated only in the pooling windows each ``e_i``
reaches, ``core.nad.local``) and :func:`principal_axes`.

The issue asks for 1,000 networks; timing the reference on 1,000 takes minutes, so both are
timed on ``NETS`` (ours: ``OUR_NETS``) networks per repeat (interleaved, median over repeats,
after a warm-up) and the per-network time is scaled to 1,000; the PCA of a 1,000 x 1,024
matrix is timed once each.
Run: ``python benchmarks/bench_nad.py``.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from torch import nn

from lightning_probes.core.nad import network_gradients
from lightning_probes.core.nad.evaluator import ChunkEvaluator
from lightning_probes.functional.nad import principal_axes

NETS = 8
OUR_NETS = 32  # ours is cheap: more networks per repeat, a steadier median
REPEATS = 5
TARGET = 3.0


class LeNet(nn.Module):
    """The authors' LeNet (``models.py``), one input channel, one output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = out.view(out.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(out)))))


def authors_gradients(num_networks: int, x0: torch.Tensor, scale: float = 100.0) -> np.ndarray:
    """``sample_gradients`` of the authors' code (``input_numerical_jacobian``, batch_size=None)."""
    shape = list(x0.shape)
    d = int(np.prod(shape))
    v = torch.eye(d).view([d, *shape])
    grads = []
    for _ in range(num_networks):
        model = LeNet().eval()

        def fn(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return -model(x)

        jac = ((fn(x0[None] + scale * v) - fn(x0[None] - scale * v)) / (2 * scale)).detach()
        grads.append(jac[:, 0].view(-1))
    return torch.stack(grads).numpy()


def ours(num_networks: int, x0: torch.Tensor) -> torch.Tensor:
    grads, _ = network_gradients(
        LeNet, (1, 32, 32), num_networks=num_networks, eval_point=x0, generator=torch.Generator()
    )
    return grads


def per_network_times(threads: int, x0: torch.Tensor) -> tuple[float, float]:
    """Median seconds per network (authors', ours), interleaved repeats at ``threads``."""
    torch.set_num_threads(threads)
    with torch.no_grad():
        authors_gradients(2, x0)
    ours(2, x0)  # warm-up
    ref_t, our_t = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            authors_gradients(NETS, x0)
        ref_t.append((time.perf_counter() - start) / NETS)
        start = time.perf_counter()
        ours(OUR_NETS, x0)
        our_t.append((time.perf_counter() - start) / OUR_NETS)
    return statistics.median(ref_t), statistics.median(our_t)


def main() -> None:
    x0 = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(0))
    settings = sorted({1, min(4, os.cpu_count() or 1)})
    times = {t: per_network_times(t, x0) for t in settings}

    g = torch.randn(1000, 1024, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    PCA(n_components=999, svd_solver="full").fit(g.numpy())
    ref_pca = time.perf_counter() - start
    start = time.perf_counter()
    principal_axes(g, 999)
    our_pca = time.perf_counter() - start

    print(f"NADs of LeNet (1x32x32, one output), CPU ({os.cpu_count()} cores visible)")
    print(f"{'stage':<40}{'authors':>10}{'ours':>10}{'ratio':>8}")
    for t, (ref_net, our_net) in times.items():
        label = f"gradients, s/network, {t} thread(s)"
        print(f"{label:<40}{ref_net:>10.4f}{our_net:>10.4f}{ref_net / our_net:>8.2f}")
    print(f"{'PCA of 1000 x 1024, s':<40}{ref_pca:>10.2f}{our_pca:>10.2f}{ref_pca / our_pca:>8.2f}")
    for t, (ref_net, our_net) in times.items():
        ref_total, our_total = 1000 * ref_net + ref_pca, 1000 * our_net + our_pca
        label = f"total 1000 networks (scaled), {t} thr, s"
        status = "met" if ref_total / our_total >= TARGET else "NOT met"
        print(
            f"{label:<40}{ref_total:>10.1f}{our_total:>10.1f}{ref_total / our_total:>8.2f}"
            f"  target >= {TARGET:.0f}x: {status}"
        )
    print(
        f"(per-network times: median of {REPEATS} interleaved repeats of {NETS} (authors) and "
        f"{OUR_NETS} (ours) networks)"
    )
    evaluator = ChunkEvaluator(LeNet(), x0, "secant", 100.0, 0, None)
    print(f"secant path: {type(evaluator.first).__name__ if evaluator.first else 'full network'}")
    if torch.cuda.is_available():  # the paper's setting; goal: under 30 s
        torch.cuda.synchronize()
        start = time.perf_counter()
        grads, _ = network_gradients(
            LeNet, (1, 32, 32), num_networks=10_000, generator=torch.Generator(), device="cuda"
        )
        principal_axes(grads, 1023)
        torch.cuda.synchronize()
        print(f"GPU, 10,000 LeNets incl. PCA: {time.perf_counter() - start:.1f} s (goal < 30 s)")
    else:
        print("GPU: none here (the 10,000-network GPU timing runs when CUDA is available)")


if __name__ == "__main__":
    main()
