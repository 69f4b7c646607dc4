"""SelectivityCallback with a real Trainer: what is logged, when, and that training is unchanged."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer, parameters_and_optimizer_state
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_probes.callbacks.selectivity import SelectivityCallback
from lightning_probes.core.selectivity import (
    class_selectivity,
    unit_ablation_impact,
    unit_mutual_information,
)
from lightning_probes.functional.selectivity import spearman_correlation


def fit(tmp_path, callbacks, max_epochs=2, ckpt_path=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, callbacks, max_steps=-1, max_epochs=max_epochs, **kwargs)
    trainer.fit(module, make_loader(), ckpt_path=ckpt_path)
    return trainer, module


def test_logged_values_match_the_core_functions(tmp_path):
    cb = SelectivityCallback(probe_size=48, mutual_information=True, importance=True, num_bins=4)
    trainer, module = fit(tmp_path, [cb])
    log = trainer.logger
    module.eval()
    x, y = cb.probe_set.inputs, cb.probe_set.targets
    si = class_selectivity(module, x, y, layers=None, num_classes=3)
    mi = unit_mutual_information(module, x, y, layers=None, num_classes=3, num_bins=4)
    impact = unit_ablation_impact(module, x, y, layers=None)
    for layer in ("net.0", "net.3"):
        key = f"probes/selectivity/{layer}"
        assert log.steps_of(f"{key}/mean") == [4, 8]
        assert log.values_of(f"{key}/mean")[-1] == pytest.approx(float(si[layer].mean()))
        frac = float((si[layer] > 0.5).double().mean())
        assert log.values_of(f"{key}/frac_selective")[-1] == pytest.approx(frac)
        assert log.values_of(f"{key}/mutual_info")[-1] == pytest.approx(float(mi[layer].mean()))
        r = float(spearman_correlation(si[layer], impact[layer]))
        assert log.values_of(f"{key}/spearman_importance")[-1] == pytest.approx(r)
        assert 0.0 <= log.values_of(f"{key}/frac_dead")[-1] <= 1.0
        assert torch.allclose(cb.last_selectivity[layer], si[layer])
        assert torch.allclose(cb.last_impact[layer], impact[layer])


def test_observer_bit_identical_and_resume(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [])
    cb = SelectivityCallback(probe_size=16, importance=True)
    trainer_b, module_b = fit(tmp_path / "b", [cb])
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = SelectivityCallback(probe_size=16)
    fit(tmp_path / "c", [first, ckpt], max_epochs=1, enable_checkpointing=True)
    resumed = SelectivityCallback(probe_size=16)
    fit(tmp_path / "d", [resumed], max_epochs=2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed._runs == 2 and resumed._last_step == 8


def test_tensorboard_histograms_and_scatter(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = SelectivityCallback(probe_size=32, importance=True, mutual_information=True)
    fit(tmp_path, [cb], max_epochs=1, logger=logger)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    hists = set(acc.Tags()["histograms"])
    assert "probes/selectivity/net.0/selectivity" in hists
    assert "probes/selectivity/net.3/ablation_impact" in hists
    assert "probes/selectivity/importance_scatter" in acc.Tags()["images"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "Expected `num_classes` to be an int >= 2, got 1"),
        ({"threshold": 2.0}, "Expected `threshold` to be in \\[0, 1\\], got 2.0"),
        ({"num_bins": 1}, "Expected `num_bins` to be an int >= 2, got 1"),
        ({"value": "one"}, "`value` can be 'zero' or 'mean', got 'one'"),
        ({"layers": []}, "Expected `layers` to name at least one layer, got an empty list"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelectivityCallback(**kwargs)


def test_points_are_traced_once_and_again_when_a_point_module_is_replaced(tmp_path, monkeypatch):
    import lightning_probes.callbacks.selectivity as selectivity_module

    traced = []
    original = selectivity_module.trace_model
    monkeypatch.setattr(
        selectivity_module, "trace_model", lambda *a, **k: traced.append(1) or original(*a, **k)
    )
    cb = SelectivityCallback(probe_size=32, every_n_steps=1)
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier()
    make_trainer(tmp_path / "a", [cb], max_steps=3).fit(module, make_loader())
    assert cb._runs == 3 and len(traced) == 1  # three runs, one trace
    module.net[4] = torch.nn.ReLU()  # the point's module replaced: traced again, right values
    make_trainer(tmp_path / "b", [cb], max_steps=1).fit(module, make_loader())
    assert len(traced) == 2
    module.eval()
    want = class_selectivity(
        module, cb.probe_set.inputs, cb.probe_set.targets, layers=None, num_classes=3
    )
    for layer, si in want.items():
        torch.testing.assert_close(cb.last_selectivity[layer], si)
