"""The README's Usage snippet, run as written on a short fit, shows every probe's values."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from conftest import TinyClassifier
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes.callbacks.base import ProbeCallback

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_snippet() -> str:
    text = README.read_text()
    usage = text[text.index("## Usage") :]
    match = re.search(r"```python\n(.*?)```", usage, re.S)
    assert match is not None
    return match.group(1)


def test_the_usage_snippet_logs_every_probe_and_early_stopping_acts(tmp_path, monkeypatch):
    monkeypatch.undo()  # the library's default budget, not the suite's exact schedules
    assert ProbeCallback.default_max_overhead == 0.03
    monkeypatch.chdir(tmp_path)  # the snippet's TensorBoardLogger("lightning_logs")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(0)
    namespace = {  # 32 batches an epoch: 20 epochs are 640 steps, a few seconds on a CPU
        "model": TinyClassifier(),
        "train_loader": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
    }
    exec(compile(usage_snippet(), str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    probes = [cb for cb in trainer.callbacks if isinstance(cb, ProbeCallback)]
    assert len(probes) == 3
    for probe in probes:
        assert probe.runs >= 1, type(probe).__name__
        assert any(k.startswith(f"probes/{probe.probe_name}/") for k in trainer.callback_metrics)
    # EarlyStopping saw a fresh AUC at every epoch end and stopped training on it
    ablation = next(p for p in probes if p.probe_name == "ablation")
    assert trainer.should_stop and trainer.current_epoch < 20
    assert ablation.runs == trainer.current_epoch and ablation.over_budget_skips == 0
    assert (tmp_path / "lightning_logs").is_dir()
