"""The n-wedge toy landscape of Fort & Jastrzebski (NeurIPS 2019), then LandscapeCallback.

Part 1 reproduces the text's qualitative claims on the toy landscape
(:func:`lightning_probes.functional.landscape.wedge_loss`: one n-wedge on every n-tuple of
axes in D dimensions, widening with the radius beyond ``start_radius``):

1. gradient descent from random points ends on wedges (D - n coordinates collapse, the rest
   stay; exactly D - n short directions in the Hessian of the bare model);
2. two independent optima are separated by a barrier on the straight segment (why averaging
   far-apart checkpoints fails) yet joined by a low-loss connector with one bend;
3. training restricted to a random d-dimensional hyperplane through a point at radius r
   succeeds with fewer dimensions when r is larger.

Part 2 trains the quickstart MLP on scikit-learn digits with ``LandscapeCallback`` and prints
what it measured (radius, drift from initialisation, radial share of updates, short
directions, segment barriers). Figures go to ``outputs/wedges/``, TensorBoard logs to
``outputs/wedges/tb``. Seeded; a few minutes at most on a CPU.
Run: ``python examples/wedges.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, TensorBoardLogger

from lightning_probes import LandscapeCallback
from lightning_probes.core.landscape.hessian import count_short_directions
from lightning_probes.functional.landscape import (
    interpolation_barrier,
    nearest_wedge,
    wedge_loss,
)
from lightning_probes.logging import new_figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsMLP, digits_loaders

OUT = Path("outputs/wedges")
D, N = 40, 30  # 40 dimensions, wedges with 30 long and 10 short directions
SLOPE, R0 = 0.03, 3.0  # wedge half-width 0.03 (r - 3) beyond radius 3


def toy_loss(points: torch.Tensor, slope: float = SLOPE) -> torch.Tensor:
    return wedge_loss(points, N, slope=slope, start_radius=R0)


def descend(points: torch.Tensor, steps: int, lr: float, slope: float = SLOPE) -> torch.Tensor:
    """Plain gradient descent on the toy loss, all points at once (independent problems)."""
    p = points.clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(toy_loss(p, slope).sum(), p)
        p = (p - lr * grad).detach().requires_grad_(True)
    return p.detach()


def claim_optimisation_ends_on_wedges(gen: torch.Generator) -> dict[str, Any]:
    start = torch.randn(200, D, generator=gen, dtype=torch.float64)
    start = start / start.norm(dim=1, keepdim=True) * 10
    end = descend(start, steps=400, lr=0.2)
    bare = descend(start, steps=400, lr=0.2, slope=0.0)
    hess = torch.func.hessian(lambda p: toy_loss(p, 0.0))(bare[0])
    short = count_short_directions(torch.linalg.eigvalsh(hess), 1.0)
    masks = nearest_wedge(end, N)
    found = {
        "final_loss_max": float(toy_loss(end).max()),
        "start_loss_mean": float(toy_loss(start).mean()),
        "distinct_wedges": len({tuple(m.tolist()) for m in masks}),
        "kept_nearest_wedge": float((masks == nearest_wedge(start, N)).all(1).double().mean()),
        "short_directions_bare": short,
    }
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for pts, label in ((start, "random start"), (end, "after descent")):
        mags = pts.abs().sort(dim=1).values.numpy()
        ax.plot(np.arange(1, D + 1), np.median(mags, 0), marker=".", label=label)
    ax.axvline(D - N + 0.5, color="grey", ls="--", label=f"D - n = {D - N}")
    ax.set_xlabel("coordinate rank (by magnitude)")
    ax.set_ylabel("median |coordinate|")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("descent ends on n-wedges: D - n coordinates collapse")
    fig.savefig(OUT / "toy_ends_on_wedges.png", bbox_inches="tight")
    return found


def chain_losses(a: torch.Tensor, mid: torch.Tensor, b: torch.Tensor, m: int = 21) -> torch.Tensor:
    t = torch.linspace(0, 1, m, dtype=a.dtype)[:, None]
    first, second = (1 - t) * a + t * mid, (1 - t) * mid + t * b
    return toy_loss(torch.cat([first, second[1:]]))


def claim_low_loss_connectors(gen: torch.Generator) -> dict[str, Any]:
    start = torch.randn(2, D, generator=gen, dtype=torch.float64) * 2
    a, b = descend(start, steps=400, lr=0.2)
    t = torch.linspace(0, 1, 41, dtype=a.dtype)
    straight = toy_loss((1 - t[:, None]) * a + t[:, None] * b)
    mid = ((a + b) / 2).requires_grad_(True)
    opt = torch.optim.Adam([mid], lr=0.05)
    for _ in range(500):
        loss = chain_losses(a, mid, b).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bent = chain_losses(a, mid.detach(), b, m=21).detach()
    shared = int((nearest_wedge(a, N) & nearest_wedge(b, N)).sum())
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(t.numpy(), straight.numpy(), label="straight segment (= weight averaging)")
    ax.plot(np.linspace(0, 1, len(bent)), bent.numpy(), label="optimised connector, one bend")
    ax.set_xlabel("position along the path")
    ax.set_ylabel("toy loss")
    ax.legend()
    ax.set_title("two independent optima: barrier vs low-loss connector")
    fig.savefig(OUT / "toy_connector.png", bbox_inches="tight")
    return {
        "endpoint_losses": (float(toy_loss(a)), float(toy_loss(b))),
        "shared_long_axes": shared,
        "straight_barrier": float(interpolation_barrier(straight, t)),
        "connector_max_loss": float(bent.max()),
    }


def claim_hyperplanes_easier_at_larger_radius(gen: torch.Generator) -> dict[str, Any]:
    radii, dims, trials = (3.0, 4.5, 10.0, 30.0), list(range(2, 13, 2)), 32
    configs = [(r, d) for r in radii for d in dims]
    count = len(configs) * trials
    theta0 = torch.randn(count, D, generator=gen)
    theta0 = theta0 / theta0.norm(dim=1, keepdim=True)
    basis = torch.linalg.qr(torch.randn(count, D, max(dims), generator=gen))[0]
    mask = torch.zeros(count, max(dims))
    scale = torch.zeros(count, 1)
    for i, (r, d) in enumerate(configs):
        mask[i * trials : (i + 1) * trials, :d] = 1.0  # a d-dimensional hyperplane
        scale[i * trials : (i + 1) * trials] = r
    # w in units of the radius, so one learning rate suits every radius
    w = torch.zeros(count, max(dims), requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.005)
    for _ in range(300):
        points = scale * (theta0 + (basis @ (w * mask)[..., None])[..., 0])
        loss = toy_loss(points).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = toy_loss(scale * (theta0 + (basis @ (w * mask)[..., None])[..., 0]))
    success = (final < 1e-6).float().reshape(len(radii), len(dims), trials).mean(-1)
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(radii):
        ax.plot(dims, success[i].numpy(), marker="o", label=f"radius {r:g}")
    ax.set_xlabel("hyperplane dimension d")
    ax.set_ylabel("fraction reaching zero loss")
    ax.legend()
    ax.set_title("random-hyperplane training is easier at larger radius")
    fig.savefig(OUT / "toy_hyperplanes.png", bbox_inches="tight")
    return {"dims": dims, **{f"r={r:g}": success[i].tolist() for i, r in enumerate(radii)}}


class Collect(Logger):
    """Keeps every logged scalar in memory (to print a summary at the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "collect"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append((step or 0, float(v)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def real_network() -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    train, _ = digits_loaders()
    probe = LandscapeCallback(
        every_n_steps=25,
        plane_every_n_runs=4,
        hessian_top_k=12,
        keep_checkpoints=3,
        checkpoint_every_n_runs=2,
        max_overhead=None,  # every scheduled run
    )
    collect = Collect()
    trainer = pl.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=[TensorBoardLogger(str(OUT), name="tb"), collect],
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(), train)
    v = collect.values
    key = "probes/landscape/"
    steps = [s for s, _ in v[key + "radius"]]
    fig = new_figure(9, 3.2)
    for i, (q, label) in enumerate(
        (
            ("radius", "radius r"),
            ("angle_from_init", "angle from init [deg]"),
            ("update_radial_cosine", "cos(Δθ, θ) of the step"),
        )
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(steps, [x for _, x in v[key + q]], marker=".")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize="medium")
    fig.tight_layout()
    fig.savefig(OUT / "digits_landscape.png", bbox_inches="tight")
    last = {q: v[key + q][-1][1] for q in ("radius", "distance_from_init", "angle_from_init")}
    return {
        "steps": trainer.global_step,
        "radius_first_last": (v[key + "radius"][0][1], last["radius"]),
        "angle_from_init_last": last["angle_from_init"],
        "init_radial_cosine_last": v[key + "init_radial_cosine"][-1][1],
        "update_radial_cosine_mean": float(
            np.mean([x for _, x in v[key + "update_radial_cosine"]])
        ),
        "short_directions": [int(x) for _, x in v[key + "short_directions"]],
        "segment_barrier_lag1_last": v[key + "segment_barrier_lag1"][-1][1],
        "segment_barrier_lag3_last": v[key + "segment_barrier_lag3"][-1][1],
        "segment_midpoint_lag3_last": v[key + "segment_midpoint_loss_lag3"][-1][1],
        "loss_last": v[key + "loss"][-1][1],
    }


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    begin = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    print(f"Toy landscape: D = {D}, n = {N}, width {SLOPE} (r - {R0}) beyond radius {R0}.")
    ends = claim_optimisation_ends_on_wedges(gen)
    print(
        f"1. Descent from 200 random points (r = 10): mean start loss "
        f"{ends['start_loss_mean']:.3f}, max final loss {ends['final_loss_max']:.1e}; "
        f"{ends['distinct_wedges']} distinct wedges reached, {ends['kept_nearest_wedge']:.0%} "
        f"on the wedge nearest their start. Bare model (width 0): "
        f"{ends['short_directions_bare']} Hessian eigenvalues > 1 = D - n short directions."
    )
    conn = claim_low_loss_connectors(gen)
    print(
        f"2. Two optima (losses {conn['endpoint_losses'][0]:.1e}, "
        f"{conn['endpoint_losses'][1]:.1e}; "
        f"{conn['shared_long_axes']} of {N} long axes shared): straight-segment barrier "
        f"{conn['straight_barrier']:.3f}; optimised one-bend connector max loss "
        f"{conn['connector_max_loss']:.1e}."
    )
    hyp = claim_hyperplanes_easier_at_larger_radius(gen)
    print("3. Fraction of random hyperplanes of dimension d reaching zero loss:")
    print("     d       " + " ".join(f"{d:5d}" for d in hyp["dims"]))
    for k, row in hyp.items():
        if k != "dims":
            print(f"     {k:7s} " + " ".join(f"{x:5.2f}" for x in row))
    print(f"   (toy part: {time.perf_counter() - begin:.1f} s)")

    real = real_network()
    print(
        f"\nDigits MLP, {real['steps']} steps with LandscapeCallback: radius "
        f"{real['radius_first_last'][0]:.2f} -> {real['radius_first_last'][1]:.2f}, angle from "
        f"init {real['angle_from_init_last']:.1f} deg, cos(θ - θ0, θ0) = "
        f"{real['init_radial_cosine_last']:.2f}, mean cos(Δθ, θ) of probed steps "
        f"{real['update_radial_cosine_mean']:.3f}."
    )
    print(
        f"Short directions (top-12 Hessian eigenvalues > 10% of the largest): "
        f"{real['short_directions']} (10 classes)."
    )
    print(
        f"Segment to the checkpoint 2 runs back: barrier {real['segment_barrier_lag1_last']:.4f}; "
        f"6 runs back: barrier {real['segment_barrier_lag3_last']:.4f}, midpoint loss "
        f"{real['segment_midpoint_lag3_last']:.4f} vs current {real['loss_last']:.4f}."
    )
    print(f"Figures in {OUT}/, TensorBoard: .venv/bin/tensorboard --logdir {OUT}/tb")
    print(f"Total {time.perf_counter() - begin:.1f} s.")


if __name__ == "__main__":
    main()
