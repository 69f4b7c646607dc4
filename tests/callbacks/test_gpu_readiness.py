"""What a GPU would show, checked on the CPU: device placement, host synchronisations, clocks.

- Every tensor a probe creates is placed explicitly (on the model's device, or on the CPU on
  purpose). Run with the default device set to ``meta`` inside the probe's hooks, a factory call
  without ``device=`` makes a meta tensor: it fails when it meets the model's tensors, or,
  worse, gives a different number; both are caught here (a CUDA model would meet the same
  misplaced CPU tensor).
- LCA runs at every step: its host synchronisations per step must not grow with the number of
  parameters (on a GPU each one stalls the queue).
- The budget's clocks are read with the model's device, so CUDA queues are drained first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer
from probe_zoo import ZOO
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes.logging as plog
from lightning_probes.callbacks import budget as budget_module

HOOKS = ("on_train_start", "on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end")


class LeNet(pl.LightningModule):
    """conv -> relu -> max_pool twice: the NAD shortcuts' index tensors are exercised."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _image_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 14, 14, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


CASES: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], DataLoader], str, dict]] = {
    "cka": (TinyClassifier, make_loader, "cka", {}),
    "cka_hutchinson": (TinyClassifier, make_loader, "cka", {"estimator": "hutchinson"}),
    "lca_adaptive": (TinyClassifier, make_loader, "lca", {"method": "adaptive"}),
    "ablation_noise": (TinyClassifier, make_loader, "ablation", {"noise": True}),
    "selectivity_mi": (
        TinyClassifier,
        make_loader,
        "selectivity",
        {"mutual_information": True, "importance": True},
    ),
    "landscape": (
        TinyClassifier,
        make_loader,
        "landscape",
        {"hessian_top_k": 2, "keep_checkpoints": 1},
    ),
    "nad_conv": (LeNet, _image_loader, "nad", {}),
}


def _fit(case: str, default_device: str | None) -> dict[str, float]:
    """Fit with the probe of ``case``; its hooks run under ``default_device`` if given."""
    make_model, make_data, probe, kwargs = CASES[case]
    pl.seed_everything(0, verbose=False)
    callback = ZOO[probe](**kwargs)
    if default_device is not None:
        for name in HOOKS:
            hook = getattr(callback, name)

            def wrapped(*args: Any, _hook: Any = hook, **kw: Any) -> Any:
                with torch.device(default_device):
                    return _hook(*args, **kw)

            setattr(callback, name, wrapped)
    trainer = make_trainer("unused", [callback], max_steps=3, enable_checkpointing=False)
    trainer.fit(make_model(), make_data())
    logged: dict[str, float] = {}
    for step, metrics in trainer.logger.records:
        logged.update({f"{k}@{step}": v for k, v in metrics.items() if k.startswith("probes/")})
    assert logged, "the probe logged nothing"
    return logged


@pytest.mark.parametrize("case", sorted(CASES))
def test_probes_place_every_tensor_they_create(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    log_scalars = plog.log_scalars

    def on_cpu(*args: Any, **kwargs: Any) -> None:  # Lightning's own logging is not ours
        with torch.device("cpu"):
            log_scalars(*args, **kwargs)

    monkeypatch.setattr(plog, "log_scalars", on_cpu)
    expected = _fit(case, None)
    got = _fit(case, "meta")  # raises (on_error="raise") if a stray tensor meets real ones
    assert got.keys() == expected.keys()
    for key, value in expected.items():  # bit for bit: nothing silently computed elsewhere
        assert got[key] == value or (value != value and got[key] != got[key]), key


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a value back to the host (``item``, ``float``, ``bool``,
    ``torch.equal``, ``nonzero``); ``tolist`` is counted by :func:`_count_tolist`."""

    OPS = {"aten::_local_scalar_dense", "aten::equal", "aten::nonzero"}

    def __init__(self, counts: list[int]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func._schema.name in self.OPS:
            self.counts[-1] += 1
        return func(*args, **(kwargs or {}))


class DeepMLP(TinyClassifier):
    def __init__(self, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(8, 16), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Linear(16, 16), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(16, 3))


def _lca_syncs_per_step(depth: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pl.seed_everything(0, verbose=False)
    callback = ZOO["lca"](probe_size=16, artefact_every_n_steps=1000)
    counts: list[int] = []
    tolist = torch.Tensor.tolist
    active = [False]

    def counted_tolist(self: torch.Tensor) -> Any:
        if active[0]:
            counts[-1] += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    for name in ("on_before_optimizer_step", "on_train_batch_end"):
        hook = getattr(callback, name)

        def wrapped(*args: Any, _hook: Any = hook, _name: str = name, **kw: Any) -> Any:
            if _name == "on_before_optimizer_step":
                counts.append(0)  # a new step
            active[0] = True
            try:
                with SyncCounter(counts):
                    return _hook(*args, **kw)
            finally:
                active[0] = False

        setattr(callback, name, wrapped)
    trainer = make_trainer("unused", [callback], max_steps=5)
    trainer.fit(DeepMLP(depth), make_loader(n=160))  # no epoch ends: no artefact steps
    assert callback.runs == 5
    return counts[1:-1]  # steady steps: not the first (cold) nor the last (artefacts)


def test_lca_host_synchronisations_per_step_do_not_grow_with_parameters(tmp_path, monkeypatch):
    """A 4-parameter-tensor and a 20-parameter-tensor MLP: the same number of read-backs per
    step (the snapshot comparison, the sums and fractions each read back once). Artefact steps
    (histograms, per-neuron fractions, the Weibull fit; every ``artefact_every_n_steps``) are
    not per-step work and are left out."""
    monkeypatch.chdir(tmp_path)
    shallow = _lca_syncs_per_step(0, monkeypatch)
    deep = _lca_syncs_per_step(8, monkeypatch)
    assert shallow == deep, (shallow, deep)
    assert max(deep) <= 40


def test_probe_runs_read_their_clocks_with_the_models_device(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    devices: list[Any] = []
    monkeypatch.setattr(budget_module, "synchronize", devices.append)
    pl.seed_everything(0, verbose=False)
    callback = ZOO["cka"](every_n_steps=1)
    make_trainer("unused", [callback], max_steps=2).fit(TinyClassifier(), make_loader())
    # fit start (start and charge) and each run (start and stop), on the model's device
    assert len(devices) == 2 + 2 * callback.runs and callback.runs == 2
    assert all(torch.device(d) == torch.device("cpu") for d in devices)
