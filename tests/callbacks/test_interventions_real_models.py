"""Ablation and selectivity callbacks on real models: BERT's dict batches keep the attention
mask through the whole probe; what selectivity cannot measure stops the fit at its start."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer

from lightning_probes.callbacks.ablation import AblationAUCCallback
from lightning_probes.callbacks.selectivity import SelectivityCallback
from lightning_probes.core.interventions.ablation import ablation_curve

pytest.importorskip("transformers")

from real_models import GPT2LM, BertClassifier, ResNet18, dict_loader, image_loader, token_data


def test_ablation_callback_on_bert_dict_batches_logs_the_masked_curve(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = BertClassifier()
    cb = AblationAUCCallback(num_orderings=2, num_points=5, probe_size=16, on_error="raise")
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=1)
    with warnings.catch_warnings():  # per-sample arguments repeated: no fallback
        warnings.filterwarnings("error", message=".*mixes activations")
        trainer.fit(model, dict_loader(token_data(32, classes=3)))
    inputs = cb.probe_set.inputs
    assert set(inputs) == {"input_ids", "attention_mask"}
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixes activations")
        curve = ablation_curve(model, inputs, cb.probe_set.targets, layers=None, num_orderings=2,
                               fractions=torch.linspace(0, 1, 5),
                               generator=torch.Generator().manual_seed(cb.seed))  # fmt: skip
    logged = trainer.logger.values_of("probes/ablation/auc")
    assert logged and logged[-1] == pytest.approx(float(curve.auc), abs=1e-6)


@pytest.mark.parametrize(
    ("make", "loader", "layers", "match"),
    [
        (lambda: ResNet18(width=4), lambda: image_loader(32, classes=3), "layer2.0.downsample.0",
         "layer 'layer2.0.downsample.0'.*BatchNorm2d.*can be negative"),
        (GPT2LM, lambda: dict_loader(token_data(32)), "model.transformer.h.0.mlp.c_fc",
         r"\[n\] class indices for class selectivity"),
    ],
)  # fmt: skip
def test_selectivity_callback_refuses_at_fit_start(tmp_path, make, loader, layers, match):
    pl.seed_everything(0, verbose=False)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = SelectivityCallback(layers=layers, num_classes=3, probe_size=8)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, loader())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
