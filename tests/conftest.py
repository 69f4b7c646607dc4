"""Shared fixtures: a tiny classifier, data, a recording logger, a Trainer factory."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")
warnings.filterwarnings("ignore", ".*tensorboardX.*")


class TinyClassifier(pl.LightningModule):
    """MLP with dropout (so RNG matters), SGD with momentum (so optimizer state matters)."""

    def __init__(self, d_in: int = 8, hidden: int = 16, classes: int = 3, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def make_data(n: int = 64, d_in: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def make_loader(
    n: int = 64, batch_size: int = 16, shuffle: bool = True, seed: int = 0
) -> DataLoader:
    return DataLoader(make_data(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


class RecordingLogger(Logger):
    """Records every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def steps_of(self, key: str) -> list[int | None]:
        return [step for step, metrics in self.records if key in metrics]

    def values_of(self, key: str) -> list[float]:
        return [metrics[key] for _, metrics in self.records if key in metrics]


def make_trainer(
    tmp_path: Any,
    callbacks: Sequence[pl.Callback] = (),
    *,
    max_steps: int = 5,
    logger: Any = None,
    **kwargs: Any,
) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=RecordingLogger() if logger is None else logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def parameters_and_optimizer_state(trainer: pl.Trainer, module: nn.Module) -> dict[str, Any]:
    """Snapshot of what training produced: weights and optimizer state (cloned)."""
    state = {f"param/{k}": v.detach().clone() for k, v in module.state_dict().items()}
    for i, opt in enumerate(trainer.optimizers):
        for j, (p_state) in enumerate(opt.state.values()):
            for name, value in p_state.items():
                if isinstance(value, torch.Tensor):
                    state[f"opt{i}/{j}/{name}"] = value.detach().clone()
    return state


@pytest.fixture(autouse=True)
def exact_schedules(monkeypatch):
    """Probes run at every scheduled step in tests (no wall-time budget), so that what is
    logged where is deterministic; the budget itself is tested in test_budget.py."""
    from lightning_probes.callbacks.base import ProbeCallback

    monkeypatch.setattr(ProbeCallback, "default_max_overhead", None)


@pytest.fixture
def tiny_module() -> TinyClassifier:
    pl.seed_everything(0, verbose=False)
    return TinyClassifier()
