"""Replay the probes over a run's saved checkpoints, after training.

    python examples/replay_checkpoints.py      # trains 60 steps (a checkpoint every 10), replays

or, on the checkpoints it wrote, the command::

    python -m lightning_probes replay \\
        --model examples/replay_checkpoints.py:ReplayMLP \\
        --checkpoints replay_example/checkpoints \\
        --data examples/replay_checkpoints.py:probe_set \\
        --probes lca,ablation,landscape --save-dir replay_example/logs

``tensorboard --logdir replay_example/logs`` then shows the probes' curves at steps 10, 20,
..., 60, under the keys a live run would have used.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import AblationAUCCallback, LandscapeCallback, LossContributionCallback
from lightning_probes.replay import ReplayResult, replay_checkpoints


class ReplayMLP(pl.LightningModule):
    """A small classifier; its hyper-parameters are saved, so the replay can rebuild it."""

    def __init__(self, d_in: int = 16, hidden: int = 32, classes: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)


def dataset(n: int = 512, d_in: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Gaussian clusters, one per class (seeded)."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.5 * torch.randn(classes, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centres[y] + torch.randn(n, d_in, generator=g), y)


def probe_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed probe set of the replay: 128 training samples."""
    x, y = dataset().tensors
    return x[:128], y[:128]


def train(out: Path, steps: int = 60, every: int = 10, seed: int = 0) -> Path:
    """Train :class:`ReplayMLP`, saving a checkpoint every ``every`` steps; returns the folder."""
    pl.seed_everything(seed, verbose=False)
    folder = out / "checkpoints"
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=every)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )
    loader = DataLoader(dataset(), batch_size=32, shuffle=True)
    trainer.fit(ReplayMLP(), loader)
    return folder


def main(out: str = "replay_example") -> ReplayResult:
    """Train, then replay LCA, the ablation AUC and the landscape probe over the checkpoints."""
    folder = train(Path(out))
    result = replay_checkpoints(
        ReplayMLP,
        folder,
        [
            LossContributionCallback(),  # one straight segment per checkpoint pair
            AblationAUCCallback(),
            LandscapeCallback(keep_checkpoints=1),  # the segment from the previous checkpoint
        ],
        probe_data=probe_set(),
        logger=TensorBoardLogger(str(Path(out) / "logs"), name="replay"),
    )
    print(result.summary())
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
