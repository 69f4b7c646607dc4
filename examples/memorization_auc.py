"""Memorising networks rely more on single directions (Morcos et al., ICLR 2018, Fig. 1 and 2).

The same MLP is trained on scikit-learn's digits twice: with the true labels and with shuffled
labels (pure memorisation), both to ~100% training accuracy. Cumulative ablation curves and
noise curves are then measured on the *training* set (as in the paper). The memorising
network's accuracy falls faster, so its area under the ablation curve is lower.

In a Lightning run, the same measurement is one callback:
``AblationAUCCallback(every_n_epochs=5, noise=True)``.

Run: ``python examples/memorization_auc.py`` (CPU, about a minute). Writes
``outputs/memorization_auc.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_probes.core.ablation import ablation_curve, noise_curve
from lightning_probes.logging import as_numpy, new_figure


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def train(x: torch.Tensor, y: torch.Tensor, seed: int, max_epochs: int = 400) -> nn.Module:
    """Adam, mini-batches of 128, until 100% training accuracy (or ``max_epochs``)."""
    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if epoch % 10 == 9:
            with torch.no_grad():
                acc = (model.eval()(x).argmax(-1) == y).float().mean().item()
            if acc == 1.0:
                break
    return model.eval()


def main() -> None:
    torch.set_num_threads(2)
    start = time.time()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    y_true = torch.tensor(digits.target)
    y_shuffled = y_true[torch.randperm(len(y_true), generator=torch.Generator().manual_seed(1))]
    probe = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))[:512]

    results = {}
    for name, labels in (("true labels", y_true), ("shuffled labels", y_shuffled)):
        model = train(x, labels, seed=0)
        xp, yp = x[probe], labels[probe]  # training samples, with the labels trained on
        curve = ablation_curve(
            model, xp, yp, layers=None, num_orderings=10, generator=torch.Generator().manual_seed(0)
        )
        noise = noise_curve(
            model, xp, yp, layers=None, scales=torch.logspace(-1, 1.5, 11),
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        train_acc = (model(x).argmax(-1) == labels).float().mean().item()
        results[name] = (curve, noise)
        print(
            f"{name:>16}: train acc {train_acc:.3f} | ablation AUC {float(curve.auc):.3f} "
            f"(normalised {float(curve.normalized_auc):.3f}) | acc with 50% units ablated "
            f"{float(curve.mean[10]):.3f} | acc at noise scale 1: "
            f"{float(noise.mean[4]):.3f}"
        )

    fig = new_figure(10, 4)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for color, (name, (curve, noise)) in zip(("C0", "C3"), results.items()):
        f, m, s = (as_numpy(t) for t in (curve.fractions, curve.mean, curve.std))
        ax1.plot(f, m, color=color, label=f"{name} (AUC {float(curve.auc):.2f})")
        ax1.fill_between(f, m - s, m + s, color=color, alpha=0.25)
        sc, nm, ns = (as_numpy(t) for t in (noise.scales, noise.mean, noise.std))
        ax2.errorbar(sc, nm, yerr=ns, color=color, marker="o", ms=3, label=name)
    ax1.set(xlabel="fraction of hidden units ablated", ylabel="training accuracy")
    ax1.set_title("Cumulative ablation (10 orderings, mean ± std)")
    ax2.set(xscale="log", xlabel="noise std / unit std", ylabel="training accuracy")
    ax2.set_title("Gaussian noise on all hidden units")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    out = Path("outputs")
    out.mkdir(exist_ok=True)
    fig.savefig(out / "memorization_auc.png", dpi=120)
    true_auc = float(results["true labels"][0].auc)
    mem_auc = float(results["shuffled labels"][0].auc)
    verdict = "lower, as in the paper" if mem_auc < true_auc else "NOT lower (unexpected)"
    print(f"memorising network's AUC {mem_auc:.3f} vs {true_auc:.3f}: {verdict}")
    print(f"saved {out / 'memorization_auc.png'} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
