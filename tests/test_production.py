"""Every probe under the conditions of real training runs (issue: production hardening).

Precision, compilation, gradient accumulation, several optimizers, frozen layers, and the bad
inputs of the README's table. Each probe runs with ``on_error="raise"`` so that a probe that
would only warn fails the test.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    TinyClassifier,
    make_data,
    make_loader,
    make_trainer,
    parameters_and_optimizer_state,
)
from probe_zoo import CLASS_TARGETS, LAYERED, ZOO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMES = sorted(ZOO)


def probe_metrics(trainer: pl.Trainer, probe: str) -> dict[str, float]:
    return {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"probes/{probe}/")
    }


def fit(tmp_path, callbacks, module=TinyClassifier, loader=None, max_steps=4, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader or make_loader())
    return trainer, model


def test_all_probes_together_leave_training_bit_identical(tmp_path):
    trainer_a, model_a = fit(tmp_path / "a", [], max_steps=6)
    trainer_b, model_b = fit(tmp_path / "b", [make() for make in ZOO.values()], max_steps=6)
    a = parameters_and_optimizer_state(trainer_a, model_a)
    b = parameters_and_optimizer_state(trainer_b, model_b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in NAMES:
        assert probe_metrics(trainer_b, name), f"{name} logged nothing"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model_b.modules())


@pytest.mark.parametrize("name", NAMES)
def test_bf16_mixed_precision_values_close_to_fp32(tmp_path, name):
    t32, _ = fit(tmp_path / "32", [ZOO[name]()], max_steps=2)
    t16, _ = fit(tmp_path / "16", [ZOO[name]()], max_steps=2, precision="bf16-mixed")
    m32, m16 = probe_metrics(t32, name), probe_metrics(t16, name)
    assert m16 and m16.keys() == m32.keys()
    assert all(torch.isfinite(torch.tensor(v)) for v in m16.values())


class Quiet(TinyClassifier):
    """No ``self.log`` in ``training_step``: with torch 2.13 + Lightning 2.6, dynamo cannot
    trace ``LightningModule.log`` (InternalTorchDynamoError, with or without probes)."""

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


class CompiledInner(Quiet):
    def __init__(self):
        super().__init__()
        self.net = torch.compile(self.net, backend="eager")


@pytest.mark.parametrize("name", NAMES)
def test_compiled_module_probes_run_on_the_eager_module(tmp_path, name):
    pl.seed_everything(0, verbose=False)
    model = torch.compile(Quiet(), backend="eager")
    trainer = make_trainer(tmp_path / "outer", [ZOO[name]()], max_steps=2)
    trainer.fit(model, make_loader())
    assert probe_metrics(trainer, name)
    trainer, _ = fit(tmp_path / "inner", [ZOO[name]()], module=CompiledInner, max_steps=2)
    assert probe_metrics(trainer, name)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_and_frozen_layer(tmp_path, name):
    class Frozen(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net[0].requires_grad_(False)

    trainer, model = fit(tmp_path, [ZOO[name]()], module=Frozen, accumulate_grad_batches=2)
    assert trainer.global_step == 4 and probe_metrics(trainer, name)
    assert not model.net[0].weight.requires_grad


class TwoOptimizers(TinyClassifier):
    """Manual optimisation with one optimizer per half of the network."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        return loss

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[:3].parameters(), lr=0.1),
            torch.optim.Adam(self.net[3:].parameters(), lr=1e-2),
        ]


@pytest.mark.parametrize("name", NAMES)
def test_several_optimizers(tmp_path, name):
    trainer, _ = fit(tmp_path, [ZOO[name]()], module=TwoOptimizers, max_steps=4)
    assert probe_metrics(trainer, name)


# ---------------------------------------------------------------- bad input, clear errors


@pytest.mark.parametrize("name", LAYERED)
def test_unknown_layer_lists_available_layers(tmp_path, name):
    with pytest.raises(ValueError, match=r"Layer 'fc9' not found in TinyClassifier.*net\.0"):
        fit(tmp_path, [ZOO[name](layers="fc9")])


@pytest.mark.parametrize("name", LAYERED)
def test_empty_layer_selection_is_rejected(name):
    with pytest.raises(ValueError, match="`layers`"):
        ZOO[name](layers=[])


@pytest.mark.parametrize("name", NAMES)
def test_probe_size_larger_than_dataset_uses_all_samples(tmp_path, name):
    probe = ZOO[name](probe_size=10_000)
    with pytest.warns(UserWarning, match="larger than the training set; using all 64 samples"):
        pl.seed_everything(0, verbose=False)
        make_trainer(tmp_path, [probe], max_steps=2).fit(TinyClassifier(), make_loader())
    assert len(probe.probe_set) == 64


class DictOutput(TinyClassifier):
    def forward(self, x):
        return {"logits": self.net(x), "features": x}

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])


@pytest.mark.parametrize("name", NAMES)
def test_dict_output_with_output_fn(tmp_path, name):
    probe = ZOO[name](output_fn=lambda out: out["logits"])
    trainer, _ = fit(tmp_path, [probe], module=DictOutput, max_steps=2)
    assert probe_metrics(trainer, name)


class Embedder(TinyClassifier):
    """Integer token inputs: embedding, mean over the sequence, then the MLP."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)

    def forward(self, tokens):
        return self.net(self.embed(tokens).mean(1))


def _token_loader():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (64, 5), generator=g)
    return DataLoader(TensorDataset(tokens, tokens[:, 0] % 3), batch_size=16, shuffle=True)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "nad"])
def test_integer_inputs(tmp_path, name):
    trainer, _ = fit(tmp_path, [ZOO[name]()], module=Embedder, loader=_token_loader())
    assert probe_metrics(trainer, name)


def test_nad_rejects_integer_inputs_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match="floating-point inputs"):
        fit(tmp_path, [ZOO["nad"]()], module=Embedder, loader=_token_loader())


class Regressor(TinyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def _regression_loader():
    data = make_data()
    x = data.tensors[0]
    return DataLoader(TensorDataset(x, x[:, :3] * 2.0), batch_size=16, shuffle=True)


@pytest.mark.parametrize("name", CLASS_TARGETS)
def test_class_probes_reject_regression_targets_at_fit_start(tmp_path, name):
    with pytest.raises(ValueError, match="needs class labels"):
        fit(tmp_path, [ZOO[name]()], module=Regressor, loader=_regression_loader())


@pytest.mark.parametrize("name", [n for n in NAMES if n not in CLASS_TARGETS])
def test_other_probes_work_on_regression(tmp_path, name):
    trainer, _ = fit(tmp_path, [ZOO[name]()], module=Regressor, loader=_regression_loader())
    assert probe_metrics(trainer, name)


class SharedLayer(TinyClassifier):
    """``net.3`` (16 -> 16) is applied twice per forward: weights shared between two places."""

    def forward(self, x):
        h = self.net[:3](x)
        h = self.net[4](self.net[3](h))
        h = self.net[4](self.net[3](h))
        return self.net[5](h)


@pytest.mark.parametrize("name", ["cka", "ablation", "selectivity"])
def test_layer_called_twice_is_rejected_at_fit_start(tmp_path, name):
    # with the default on_error="warn": a configuration error still stops fit, before step 1
    probe = ZOO[name](layers="net.3", on_error="warn")
    with pytest.raises(ValueError, match="Expected layer 'net.3' to run exactly once per forward"):
        fit(tmp_path, [probe], module=SharedLayer)
    assert probe._runs == 0
