"""Probes work with both `pytorch_lightning.Trainer` and `lightning.pytorch.Trainer`."""

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes.lightning as lp_lightning
import lightning_probes.pl as lp_pl
from lightning_probes.callbacks.base import ProbeCallback


class CountingProbe(ProbeCallback):
    probe_name = "count"
    default_schedule = {"every_n_steps": 1}

    def probe(self, trainer, pl_module, data):
        self.log_scalars(trainer, pl_module, {self.key("n"): float(len(data))})


def _module(base):
    class M(base):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x)

        def training_step(self, batch, idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return M()


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(16, 4, generator=g), torch.arange(16) % 2), batch_size=4
    )


def test_lightning_namespace_classes_are_lightning_callbacks():
    ProbeL = lp_lightning.ProbeCallback
    assert issubclass(ProbeL, L.Callback) and issubclass(ProbeL, ProbeCallback)
    assert ProbeL.__module__ == "lightning_probes.lightning" and ProbeL.__name__ == "ProbeCallback"
    assert lp_lightning.ProbeCallback is ProbeL  # built once
    assert lp_pl.ProbeCallback is ProbeCallback


def test_probe_runs_under_both_trainers(tmp_path):
    ProbeL = type("CountingProbeL", (CountingProbe, L.Callback), {})
    for trainer_cls, module_base, cb in (
        (pl.Trainer, pl.LightningModule, CountingProbe(probe_size=8)),
        (L.Trainer, L.LightningModule, ProbeL(probe_size=8)),
    ):
        trainer = trainer_cls(
            default_root_dir=str(tmp_path),
            max_steps=3,
            callbacks=[cb],
            logger=True,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(_module(module_base), _loader())
        assert float(trainer.callback_metrics["probes/count/n"]) == 8.0
        assert cb._runs == 3


def test_state_key_is_the_same_in_both_namespaces():
    assert (
        lp_lightning.ProbeCallback(every_n_steps=3).state_key
        == ProbeCallback(every_n_steps=3).state_key
    )
