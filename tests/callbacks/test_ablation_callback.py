"""AblationAUCCallback with a real Trainer: logging, EarlyStopping, built-in stopping, resume."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer, parameters_and_optimizer_state
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from lightning_probes.callbacks.ablation import AblationAUCCallback
from lightning_probes.core.ablation import AblationCurve, ablation_curve

AUC = "probes/ablation/auc"


def fit(tmp_path, callbacks, max_epochs=3, ckpt_path=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier()
    trainer = make_trainer(tmp_path, callbacks, max_steps=-1, max_epochs=max_epochs, **kwargs)
    trainer.fit(module, make_loader(), ckpt_path=ckpt_path)  # 4 steps per epoch
    return trainer, module


class Scripted(AblationAUCCallback):
    """The AUC of run i is script[i] (tests the decision logic, not the curve)."""

    def __init__(self, script, **kwargs):
        super().__init__(**kwargs)
        self.script = list(script)

    def _measure(self, pl_module, data):
        auc = torch.tensor(self.script[self._runs], dtype=torch.float64)
        one = torch.ones(2, dtype=torch.float64)
        return AblationCurve(
            torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), one[None], one, one * 0, auc, auc,
            torch.zeros(1, 1, dtype=torch.long), {"x": 1},
        )  # fmt: skip


def test_logs_the_auc_of_the_model_at_each_epoch_end(tmp_path):
    cb = AblationAUCCallback(num_orderings=3, num_points=6, probe_size=32, seed=5)
    trainer, module = fit(tmp_path, [cb])
    logger = trainer.logger
    assert logger.steps_of(AUC) == [4, 8, 12]
    for key in ("auc_normalized", "accuracy"):
        assert logger.steps_of(f"probes/ablation/{key}") == [4, 8, 12]
    module.eval()
    data = cb.probe_set
    curve = ablation_curve(
        module, data.inputs, data.targets, layers=None, num_orderings=3,
        fractions=torch.linspace(0, 1, 6), generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert logger.values_of(AUC)[-1] == pytest.approx(float(curve.auc), abs=1e-12)
    assert logger.values_of("probes/ablation/accuracy")[-1] == pytest.approx(float(curve.mean[0]))
    assert len(cb.probe_set) == 32 and cb.last_curve.num_units == {"net.0": 16, "net.3": 16}


def test_observer_bit_identical(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], max_epochs=2)
    cb = AblationAUCCallback(num_orderings=2, num_points=5, probe_size=16, noise=True)
    trainer_b, module_b = fit(tmp_path / "b", [cb], max_epochs=2)
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert "probes/ablation/noise_auc" in trainer_b.callback_metrics


def test_builtin_early_stopping_on_a_scripted_sequence(tmp_path, caplog, monkeypatch):
    decisions = []
    original = pl.strategies.SingleDeviceStrategy.reduce_boolean_decision

    def spy(self, decision, all=True):
        decisions.append((decision, all))
        return original(self, decision, all)

    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "reduce_boolean_decision", spy)
    script = [0.5, 0.6, 0.55, 0.6, 0.59, 0.9, 0.9]  # best at run 2, then 3 runs without
    cb = Scripted(script, early_stopping=True, patience=3, probe_size=8)
    with caplog.at_level(logging.INFO):
        trainer, _ = fit(tmp_path, [cb], max_epochs=10)
    assert cb._runs == 5 and trainer.current_epoch == 5 and trainer.global_step == 20
    # one at fit start (did any rank run out of memory there?), then one vote per run
    assert decisions == [(False, False)] * 5 + [(True, False)]
    assert "stopping training at epoch 4, step 20: probes/ablation/auc = 0.5900 has not " in (
        caplog.text
    )
    assert "for 3 runs (patience=3); best 0.6000 at step 8" in caplog.text


def test_early_stopping_resumes_from_a_checkpoint(tmp_path):
    script = [0.5, 0.6, 0.55, 0.6, 0.59, 0.9, 0.9]
    full = Scripted(script, early_stopping=True, patience=3, probe_size=8)
    fit(tmp_path / "full", [full], max_epochs=10)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = Scripted(script, early_stopping=True, patience=3, probe_size=8)
    fit(tmp_path / "a", [first, ckpt], max_epochs=3, enable_checkpointing=True)
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = raw["callbacks"][first.state_key]
    assert state["best"] == 0.6 and state["wait"] == 1 and state["runs"] == 3
    resumed = Scripted(script, early_stopping=True, patience=3, probe_size=8)
    trainer, _ = fit(
        tmp_path / "b", [resumed], max_epochs=10, ckpt_path=tmp_path / "ckpt/last.ckpt"
    )
    assert resumed.extra_state() == full.extra_state()
    assert resumed._runs == full._runs == 5 and trainer.global_step == 20


def test_lightning_early_stopping_sees_no_stale_value(tmp_path):
    # runs at the end of epochs 1, 3, 5 (every 2nd); AUC falls at every run
    cb = Scripted([0.9, 0.8, 0.7, 0.6], every_n_epochs=2, probe_size=8)
    es = EarlyStopping(monitor=AUC, mode="max", patience=2, strict=False)
    trainer, _ = fit(tmp_path, [cb, es], max_epochs=12)
    # a stale 0.9 at epoch 2 would count as a second non-improvement and stop at epoch 3
    assert es.stopped_epoch == 5 and cb._runs == 3
    assert trainer.logger.steps_of(AUC) == [8, 16, 24]


def test_strict_early_stopping_with_sparse_schedule_warns(tmp_path):
    cb = Scripted([0.9] * 5, every_n_epochs=2, probe_size=8)
    es = EarlyStopping(monitor=AUC, mode="max", patience=5)
    with (
        pytest.warns(UserWarning, match="pass `EarlyStopping\\(..., strict=False\\)`|strict=False"),
        pytest.raises(RuntimeError, match="conditioned on metric `probes/ablation/auc`"),
    ):
        fit(tmp_path, [cb, es], max_epochs=3)


def test_tensorboard_gets_the_curve_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = AblationAUCCallback(num_orderings=2, num_points=5, probe_size=16, noise=True)
    fit(tmp_path, [cb], max_epochs=1, logger=logger)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert {"probes/ablation/curve", "probes/ablation/noise_curve"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Scalars(AUC)] == [4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_orderings": 0}, "Expected `num_orderings` to be an int >= 1, got 0"),
        ({"num_points": 1}, "Expected `num_points` to be an int >= 2, got 1"),
        ({"patience": 0}, "Expected `patience` to be a positive int, got 0"),
        ({"value": "max"}, "`value` can be 'zero' or 'mean', got 'max'"),
        ({"monitor": "loss"}, "`monitor` can be auc, auc_normalized, got 'loss'"),
        ({"min_delta": -1}, "Expected `min_delta` to be a number >= 0, got -1"),
        ({"layers": []}, "Expected `layers` to name at least one layer, got an empty list"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AblationAUCCallback(**kwargs)


def test_unknown_layer_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="Layer 'net.9' not found in TinyClassifier"):
        fit(tmp_path, [AblationAUCCallback(layers="net.9")], max_epochs=1)


class DictOutput(TinyClassifier):
    def forward(self, x):
        return {"logits": self.net(x)}

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])


def test_unusable_model_output_stops_fit_before_the_first_step(tmp_path):
    # an error at fit start, not a warning at every run (on_error="warn" is the default)
    probe = AblationAUCCallback()
    trainer = make_trainer(tmp_path, [probe], max_steps=4)
    with pytest.raises(TypeError, match="Pass `output_fn=`"):
        trainer.fit(DictOutput(), make_loader())
    assert probe._runs == 0 and trainer.global_step == 0


def test_predicted_first_run_cost_counts_one_forward_per_mask():
    from lightning_probes.core.cost import CostUnits

    units = CostUnits(
        forward_seconds=0.01, num_samples=64, num_outputs=3, flops_per_second=1e9,
        bytes_per_second=1e9, figure_seconds=0.0,
    )  # fmt: skip
    cb = AblationAUCCallback(num_orderings=4, num_points=5)
    assert cb.predict_cost(TinyClassifier(), None, units) == pytest.approx(4 * 5 * 0.01)
    noisy = AblationAUCCallback(num_orderings=4, num_points=5, noise=True, noise_scales=[1, 2])
    assert noisy.predict_cost(TinyClassifier(), None, units) == pytest.approx((20 + 6) * 0.01)
