"""Neural Anisotropy Directions of LeNet, and the directional bias they predict.

Ortiz-Jiménez et al., "Neural Anisotropy Directions", NeurIPS 2020, Fig. 1-2, with the
authors' LeNet (1x32x32 input, one output) and their procedure (central differences with step
100 at one standard-normal point, PCA over random initialisations):

1. NADs of LeNet: the first ones are the constant image and low frequencies (see
   ``outputs/nads_lenet/nads.png``, pixel and Fourier domain, and ``spectrum.png``).
2. Directional bias: LeNet (two outputs) trained on the linearly separable dataset
   D(v) = +-(eps/2) v + P_perp(sigma n) learns it well when v is a first NAD and hardly when v
   is one of the last ones (``directional_bias.png``).

Scaled down to run in a few minutes on one CPU core, which changes numbers but not the
picture: the paper uses 10,000 networks, this example ``NUM_NETWORKS = 128`` (the NADs then
span 127 dimensions: the first ones match the paper's, the "last" here are the last of those
127, the least-varying directions the sample resolves); the paper trains on 10,000 samples of
D(v) with sigma = 3 for 20 epochs, this example on 4,000 samples with ``SIGMA = 1`` for 10
epochs (with sigma = 3 that short a run stays near chance along every direction).
Run: ``python examples/nads_lenet.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_probes.core.nad import neural_anisotropy_directions
from lightning_probes.functional.nad import directional_dataset

NUM_NETWORKS = 128
SIGMA = 1.0
EPOCHS = 10
OUT = Path("outputs/nads_lenet")


class LeNet(nn.Module):
    """The authors' LeNet (``models.py`` of their code)."""

    def __init__(self, num_classes: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = out.view(out.size(0), -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(out)))))


def low_frequency_share(nad: torch.Tensor, radius: int = 2) -> float:
    """Share of a NAD's energy at spatial frequencies within ``radius`` of DC."""
    power = torch.fft.fftshift(torch.fft.fft2(nad[0])).abs().square()
    h, w = power.shape
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    return float(power[(yy.abs() <= radius) & (xx.abs() <= radius)].sum() / power.sum())


def train_on_direction(v: torch.Tensor, seed: int, epochs: int = EPOCHS) -> float:
    """Test accuracy of LeNet trained on D(v) (the authors' recipe, shortened)."""
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = directional_dataset(v, 4000, sigma=SIGMA, epsilon=1.0, generator=g)
    x_test, y_test = directional_dataset(v, 2000, sigma=SIGMA, epsilon=1.0, generator=g)
    torch.manual_seed(seed)
    net = LeNet(num_classes=2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.0)
    steps, step, batch = epochs * (len(x_train) // 128), 0, 128
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=g)
        for start in range(0, len(x_train) - batch + 1, batch):
            idx = order[start : start + batch]
            for group in opt.param_groups:  # linear decay to 0, as the authors
                group["lr"] = 0.5 * (1 - step / steps)
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
            step += 1
    net.eval()
    with torch.no_grad():
        return float((net(x_test).argmax(1) == y_test).float().mean())


def main() -> None:
    from matplotlib.figure import Figure

    torch.set_num_threads(1)  # small batches: one thread is fastest (and kind to shared CPUs)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    nads = neural_anisotropy_directions(
        LeNet,
        (1, 32, 32),
        num_networks=NUM_NETWORKS,
        generator=torch.Generator().manual_seed(0),
        progress=True,
    )
    k = nads.directions.shape[0]
    print(
        f"NADs of LeNet from {NUM_NETWORKS} networks: {k} directions, "
        f"{time.perf_counter() - start:.1f} s"
    )
    for i in (0, 1, 2, 5, k // 2, k - 1):
        low = low_frequency_share(nads.directions[i])
        ratio = float(nads.explained_variance_ratio[i])
        print(f"  NAD {i:>3}: energy within 2 freq. of DC {low:6.1%}, variance share {ratio:.4f}")

    shown = list(range(8))
    fig = Figure(figsize=(2 * len(shown), 4.2))
    for col, i in enumerate(shown):
        nad = nads.directions[i, 0].numpy()
        lim = np.abs(nad).max()
        ax = fig.add_subplot(2, len(shown), col + 1)
        ax.imshow(nad, cmap="BrBG", vmin=-lim, vmax=lim)
        ax.set_title(f"NAD {i}")
        ax.axis("off")
        ax = fig.add_subplot(2, len(shown), len(shown) + col + 1)
        ax.imshow(np.abs(np.fft.fftshift(np.fft.fft2(nad))) ** 2, cmap="magma")
        ax.axis("off")
    fig.suptitle("LeNet NADs (top) and |DFT|^2, DC in the centre (bottom)")
    fig.savefig(OUT / "nads.png", dpi=100)

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(nads.singular_values.numpy(), ".", ms=3)
    ax.set(xlabel="NAD index", ylabel="singular value", title="LeNet NAD spectrum")
    fig.tight_layout()
    fig.savefig(OUT / "spectrum.png", dpi=100)

    indices = [0, 1, 2, 4, 8, 16, 32, 64, k - 2, k - 1]
    accuracy = {}
    for i in indices:
        accuracy[i] = train_on_direction(nads.directions[i].float(), seed=i)
        print(f"  D(v) along NAD {i:>3}: test accuracy {accuracy[i]:.3f}", flush=True)
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar([str(i) for i in indices], [accuracy[i] for i in indices])
    ax.axhline(0.5, color="k", lw=0.5, ls="--")
    ax.set(
        xlabel="NAD index of v",
        ylabel="test accuracy",
        ylim=(0.4, 1.0),
        title="LeNet on D(v): directional inductive bias",
    )
    fig.tight_layout()
    fig.savefig(OUT / "directional_bias.png", dpi=100)
    first, last = accuracy[0], accuracy[k - 1]
    print(
        f"Directional bias: NAD 0 -> {first:.3f}, NAD {k - 1} -> {last:.3f} "
        f"({'as in the paper' if first > last + 0.2 else 'weaker than in the paper'}). "
        f"Figures in {OUT}/ ({time.perf_counter() - start:.0f} s in all)."
    )


if __name__ == "__main__":
    main()
