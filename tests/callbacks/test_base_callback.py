"""Behaviour of the ProbeCallback base with a real Trainer on CPU."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    RecordingLogger,
    TinyClassifier,
    make_data,
    make_loader,
    make_trainer,
    parameters_and_optimizer_state,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.core.data import ProbeSet


class MeddlingProbe(ProbeCallback):
    """A probe that does everything a careless probe could: backward into .grad, train-mode
    forward (dropout, RNG), random draws, and a hook it never removes."""

    probe_name = "meddle"
    needs_grad = True
    default_schedule = {"every_n_steps": 1}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen_steps: list[int] = []
        self.seen_sizes: list[int] = []

    def probe(self, trainer, pl_module, data: ProbeSet) -> None:
        self.seen_steps.append(trainer.global_step)
        self.seen_sizes.append(len(data))
        pl_module.train()
        pl_module.register_forward_hook(lambda m, a, o: o * 1.0)
        loss = nn.functional.cross_entropy(pl_module(data.inputs), data.targets)
        loss.backward()
        torch.randn(100)
        self.log_scalars(trainer, pl_module, {self.key("loss"): loss.detach()})


class FailingProbe(ProbeCallback):
    probe_name = "failing"
    default_schedule = {"every_n_steps": 1}

    def probe(self, trainer, pl_module, data):
        pl_module.eval()
        pl_module.net[0].weight.requires_grad_(False)
        pl_module.register_forward_hook(lambda m, a, o: o)
        raise ArithmeticError("boom")


def fit(tmp_path, callbacks, max_steps=5, module=TinyClassifier, loader=None, **kwargs):
    """Seed, build ``module()`` (a class or factory), and train for ``max_steps``."""
    pl.seed_everything(0, verbose=False)
    module = module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(module, loader or make_loader())
    return trainer, module


def test_observer_bit_identical_weights_and_optimizer_state(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], max_steps=8)
    probe = MeddlingProbe(probe_size=32)
    trainer_b, module_b = fit(tmp_path / "b", [probe], max_steps=8)
    assert probe.seen_steps == list(range(1, 9))
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys() and len(a) > 6
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # nothing left on the model: no hooks, modes as training left them, grads untouched
    assert not any(m._forward_hooks for m in module_b.modules())
    assert all(p.requires_grad for p in module_b.parameters())


def test_observer_with_batchnorm_buffers(tmp_path):
    class BNNet(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)
            )

    trainer_a, module_a = fit(tmp_path / "a", [], module=BNNet)
    trainer_b, module_b = fit(tmp_path / "b", [MeddlingProbe(probe_size=16)], module=BNNet)
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert any("running_mean" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_scalars_reach_the_logger_at_each_scheduled_step(tmp_path):
    # log_every_n_steps=50 would drop these if they only went through LightningModule.log
    trainer, _ = fit(tmp_path, [MeddlingProbe(every_n_steps=2, probe_size=16)], max_steps=7)
    logger = trainer.logger
    assert isinstance(logger, RecordingLogger)
    assert logger.steps_of("probes/meddle/loss") == [2, 4, 6]
    assert "probes/meddle/loss" in trainer.callback_metrics


def test_at_steps_and_start_step(tmp_path):
    probe = MeddlingProbe(at_steps=[1, 3, 100], probe_size=8)
    fit(tmp_path / "a", [probe], max_steps=5)
    assert probe.seen_steps == [1, 3]
    probe = MeddlingProbe(every_n_steps=2, start_step=3, probe_size=8)
    fit(tmp_path / "b", [probe], max_steps=8)
    assert probe.seen_steps == [3, 5, 7]


def test_every_n_epochs_runs_at_epoch_end(tmp_path):
    probe = MeddlingProbe(every_n_epochs=2, probe_size=8)
    trainer, _ = fit(tmp_path, [probe], max_steps=-1, max_epochs=4)  # 4 batches per epoch
    assert probe.seen_steps == [8, 16]
    assert trainer.logger.steps_of("probes/meddle/loss") == [8, 16]


def test_gradient_accumulation_runs_once_per_optimizer_step(tmp_path):
    probe = MeddlingProbe(every_n_steps=1, probe_size=8)
    fit(tmp_path, [probe], max_steps=3, accumulate_grad_batches=2)
    assert probe.seen_steps == [1, 2, 3]


def test_never_runs_in_sanity_check_or_validation(tmp_path):
    probe = MeddlingProbe(every_n_steps=1, probe_size=8)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [probe], max_steps=2)
    trainer.num_sanity_val_steps = 2
    trainer.fit(TinyClassifier(), make_loader(), make_loader(seed=1))
    assert probe.seen_steps == [1, 2]


def test_probe_set_drawn_once_seeded_and_reused(tmp_path):
    p1, p2 = MeddlingProbe(probe_size=10, seed=3), MeddlingProbe(probe_size=10, seed=3)
    fit(tmp_path / "a", [p1], max_steps=2)
    fit(tmp_path / "b", [p2], max_steps=2, loader=make_loader(shuffle=False))
    assert torch.equal(p1.probe_set.inputs, p2.probe_set.inputs)
    data = make_data()
    # the drawn rows are rows of the dataset
    rows = (p1.probe_set.inputs[:, None, :] == data.tensors[0][None]).all(-1).any(-1)
    assert rows.all() and p1.seen_sizes == [10, 10]
    p3 = MeddlingProbe(probe_size=10, seed=4)
    fit(tmp_path / "c", [p3], max_steps=1)
    assert not torch.equal(p1.probe_set.inputs, p3.probe_set.inputs)


def test_probe_size_larger_than_dataset_uses_all_and_warns(tmp_path):
    probe = MeddlingProbe(probe_size=1000)
    with pytest.warns(UserWarning, match="larger than the training set; using all 64 samples"):
        fit(tmp_path, [probe], max_steps=1)
    assert probe.seen_sizes == [64]


def test_user_probe_data_and_dict_batches(tmp_path):
    x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
    probe = MeddlingProbe(probe_data=(x, y))
    fit(tmp_path / "a", [probe], max_steps=1)
    assert torch.equal(probe.probe_set.inputs, x)

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {"x": torch.full((8,), float(i)), "label": torch.tensor(i % 3)}

    class DictModule(TinyClassifier):
        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["x"]), batch["label"])

    probe = MeddlingProbe(probe_size=6)
    fit(
        tmp_path / "b",
        [probe],
        max_steps=1,
        module=DictModule,
        loader=DataLoader(DictData(), batch_size=4),
    )
    assert probe.probe_set.inputs.shape == (6, 8) and probe.probe_set.targets.shape == (6,)
    assert torch.equal(probe.probe_set.targets, probe.probe_set.inputs[:, 0].long() % 3)

    custom = MeddlingProbe(probe_size=6, batch_to_inputs_targets=lambda b: (b["x"] * 0, b["label"]))
    fit(
        tmp_path / "c",
        [custom],
        max_steps=1,
        module=DictModule,
        loader=DataLoader(DictData(), batch_size=4),
    )
    assert custom.probe_set.inputs.abs().sum() == 0


def test_failing_probe_warns_with_its_name_and_leaves_model_unaltered(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], max_steps=3)
    with pytest.warns(UserWarning, match="FailingProbe failed at step 1 .*ArithmeticError: boom"):
        trainer_b, module_b = fit(tmp_path / "b", [FailingProbe(probe_size=4)], max_steps=3)
    for key, value in parameters_and_optimizer_state(trainer_a, module_a).items():
        assert torch.equal(value, parameters_and_optimizer_state(trainer_b, module_b)[key])
    assert module_b.training and all(p.requires_grad for p in module_b.parameters())
    assert not any(m._forward_hooks for m in module_b.modules())


def test_failing_probe_can_raise(tmp_path):
    with pytest.raises(RuntimeError, match="FailingProbe failed at step 1"):
        fit(tmp_path, [FailingProbe(probe_size=4, on_error="raise")], max_steps=3)


def test_logger_false_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="MeddlingProbe needs a logger .* `logger=False`"):
        fit(tmp_path, [MeddlingProbe()], logger=False)


def test_scalars_only_logger_scalars_flow_and_one_warning(tmp_path):
    logger = RecordingLogger()  # a logger with no form for histograms, images or figures
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [MeddlingProbe(every_n_steps=1, probe_size=4)], logger=logger)
    msgs = [str(w.message) for w in caught if "take scalars only" in str(w.message)]
    assert len(msgs) == 1 and "histograms, images and figures are not" in msgs[0]
    assert "RecordingLogger" in msgs[0]
    assert "probes/meddle/loss" in trainer.callback_metrics


def test_csv_logger_warns_once_that_histograms_are_not_logged(tmp_path):
    logger = CSVLogger(str(tmp_path))  # takes images and figures (PNG files), not histograms
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [MeddlingProbe(every_n_steps=1, probe_size=4)], logger=logger)
    msgs = [str(w.message) for w in caught if "MeddlingProbe: " in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("MeddlingProbe: histograms are not logged")
    assert "CSVLogger" in msgs[0] and "images and figures are logged" in msgs[0]
    assert "probes/meddle/loss" in trainer.callback_metrics


def test_tensorboard_receives_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, _ = fit(tmp_path, [MeddlingProbe(every_n_steps=2, probe_size=4)], logger=logger)
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("probes/meddle/loss")] == [2, 4]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"probe_size": 0}, ValueError, "Expected `probe_size` to be a positive int, got 0"),
        ({"on_error": "ignore"}, ValueError, "`on_error` can be 'warn' or 'raise', got 'ignore'"),
        ({"batch_to_inputs_targets": 3}, TypeError, "Expected `batch_to_inputs_targets` to be a"),
        ({"probe_data": "abc"}, TypeError, "Expected `probe_data` to be a Tensor, a tuple"),
        ({"probe_data": (torch.zeros(3, 2), torch.zeros(4))}, ValueError, "with 3 rows"),
        ({"every_n_steps": 1, "every_n_epochs": 1}, ValueError, "exactly one of"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MeddlingProbe(**kwargs)


def test_state_dict_round_trip_through_checkpoint_weights_only(tmp_path):
    probe = MeddlingProbe(every_n_steps=2, probe_size=4)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(tmp_path, [probe, ckpt], max_steps=5, enable_checkpointing=True)
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert raw["callbacks"][probe.state_key] == {
        "runs": 2,
        "last_step": 4,
        "identity": "MeddlingProbe{}",
    }
    resumed = MeddlingProbe(every_n_steps=2, probe_size=4)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "r", [resumed], max_steps=8)
    trainer.fit(TinyClassifier(), make_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.seen_steps == [6, 8] and resumed._runs == 4


def test_resume_with_a_new_schedule_restores_the_state(tmp_path):
    """The state key includes the schedule; a probe resumed with another `every_n_steps` finds
    its state by type and schedule-free configuration (it used to start afresh silently)."""
    probe = MeddlingProbe(every_n_steps=2, probe_size=4)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(tmp_path, [probe, ckpt], max_steps=5, enable_checkpointing=True)
    resumed = MeddlingProbe(every_n_steps=3, probe_size=4)
    assert resumed.state_key != probe.state_key
    trainer = make_trainer(tmp_path / "r", [resumed], max_steps=9)
    with pytest.warns(UserWarning, match="restored its state .* schedule changed"):
        trainer.fit(TinyClassifier(), make_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed._runs == 2 + len(resumed.seen_steps) and resumed.seen_steps == [6, 9]


def test_state_keys_differ_by_configuration():
    assert MeddlingProbe(every_n_steps=2).state_key != MeddlingProbe(every_n_steps=3).state_key
    assert MeddlingProbe(every_n_steps=2).state_key == MeddlingProbe(every_n_steps=2).state_key


class NaNProbe(ProbeCallback):
    probe_name = "nan"
    default_schedule = {"every_n_steps": 1}

    def probe(self, trainer, pl_module, data):
        value = float("nan") if trainer.global_step % 2 else 1.0
        self.log_scalars(trainer, pl_module, {self.key("v"): value, self.key("w"): 2.0})


def test_non_finite_values_skip_the_run_warn_once_and_training_continues(tmp_path):
    probe = NaNProbe(probe_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, [probe], max_steps=5)
    msgs = [str(w.message) for w in caught if "skipped its run" in str(w.message)]
    assert len(msgs) == 1 and "step 1: non-finite values for probes/nan/v" in msgs[0]
    assert trainer.global_step == 5
    assert trainer.logger.steps_of("probes/nan/v") == [2, 4]
    assert trainer.logger.steps_of("probes/nan/w") == [2, 4]  # the whole run is skipped
    assert probe._runs == 2


def test_non_finite_weights_skip_the_run(tmp_path):
    class Poison(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    probe = MeddlingProbe(probe_size=4)
    with pytest.warns(
        UserWarning, match="skipped its run at step 2: the model's parameters are not finite"
    ):
        trainer, _ = fit(tmp_path, [Poison(), probe], max_steps=4)
    assert trainer.global_step == 4 and probe.seen_steps == [1]


def test_state_key_is_built_once_since_lightning_reads_it_at_every_hook(tmp_path):
    class Counting(MeddlingProbe):
        built = 0

        def _state_key_config(self):
            type(self).built += 1
            return super()._state_key_config()

    probe = Counting(every_n_steps=2)
    make_trainer(tmp_path, [probe], max_steps=4).fit(TinyClassifier(), make_loader())
    assert Counting.built == 1 and "Counting{'every_n_steps': 2" in probe.state_key


def test_restored_per_parameter_state_is_checked(tmp_path):
    """A transposed (square) or missing tensor in LCA's cumulative allocation used to give a
    silently wrong cumulative LC; now the edit is refused on load and a mismatch with the
    model's parameters at fit start, each naming the tensors."""
    import lightning_probes as lp

    def run(root, ckpt_path=None, steps=3, module=None):
        lca = lp.LossContributionCallback(every_n_steps=1, probe_size=16, on_error="raise")
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
        trainer = make_trainer(root, [lca, ckpt], max_steps=steps, enable_checkpointing=True)
        trainer.fit(module or TinyClassifier(hidden=16), make_loader(), ckpt_path=ckpt_path)
        return lca

    lca = run(tmp_path / "a")
    path = tmp_path / "ckpt" / "last.ckpt"
    raw = torch.load(path, weights_only=True)
    cum = raw["callbacks"][lca.state_key]["cumulative"]
    square = "net.3.weight"  # Linear(16, 16): a transposed copy has the same shape
    cum[square] = cum[square].T.contiguous()
    torch.save(raw, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"`cumulative` was changed after it was saved.*net\.3"):
        run(tmp_path / "b", str(tmp_path / "edited.ckpt"), steps=5)
    # without fingerprints (a checkpoint edited by hand): missing and reshaped tensors are
    # found against the model's parameters at fit start
    state = raw["callbacks"][lca.state_key]
    del state["fingerprints"]
    cum[square] = cum[square].T.contiguous()  # back to the saved layout
    del cum["net.0.bias"]
    cum["net.0.weight"] = cum["net.0.weight"].T.contiguous()  # [16, 8] -> [8, 16]
    torch.save(raw, tmp_path / "edited2.ckpt")
    with pytest.raises(ValueError, match=r"missing: net\.0\.bias; shaped differently: net\.0"):
        run(tmp_path / "c", str(tmp_path / "edited2.ckpt"), steps=5)
