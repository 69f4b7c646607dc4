"""The wall-time budget (`max_overhead`): probes skip scheduled runs to stay within it."""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
from conftest import TinyClassifier, make_loader, make_trainer

from lightning_probes.callbacks.base import ProbeCallback


class SlowProbe(ProbeCallback):
    """Each run costs ``cost`` seconds of wall time."""

    probe_name = "slow"
    default_schedule = {"every_n_steps": 1}

    def __init__(self, cost: float, **kwargs):
        super().__init__(**kwargs)
        self.cost = cost
        self.steps: list[int] = []

    def probe(self, trainer, pl_module, data):
        self.steps.append(trainer.global_step)
        time.sleep(self.cost)


class SlowTraining(TinyClassifier):
    """Each training step costs at least 20 ms, so the budget arithmetic is predictable."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def _fit(tmp_path, probe, steps=40):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, [probe], max_steps=steps)
    start = time.perf_counter()
    trainer.fit(SlowTraining(), make_loader(n=256))
    return time.perf_counter() - start


def test_budget_bounds_the_probe_share_of_wall_time(tmp_path):
    probe = SlowProbe(cost=0.05, max_overhead=0.25)
    with pytest.warns(
        UserWarning, match=r"SlowProbe: skipping scheduled runs .* `max_overhead=0.25`"
    ):
        total = _fit(tmp_path, probe)
    spent = len(probe.steps) * probe.cost
    # runs after the first are predicted from the last one's cost: within the budget, up to
    # timing jitter (the first run's cost is not predicted)
    assert spent <= 0.25 * (total - spent) + 0.5 * probe.cost
    assert 1 <= len(probe.steps) < 40 and probe.over_budget_skips == 40 - len(probe.steps)
    assert probe.steps[0] == 1  # the first scheduled run happens


def test_no_budget_runs_every_scheduled_step(tmp_path):
    probe = SlowProbe(cost=0.05, max_overhead=None)
    _fit(tmp_path, probe, steps=10)
    assert probe.steps == list(range(1, 11)) and probe.over_budget_skips == 0
    assert probe.runs == 10


def test_default_budget_is_the_class_default(monkeypatch):
    monkeypatch.setattr(ProbeCallback, "default_max_overhead", 0.04)
    assert SlowProbe(cost=0).max_overhead == 0.04
    assert SlowProbe(cost=0, max_overhead=0.5).max_overhead == 0.5
    assert SlowProbe(cost=0, max_overhead=None).max_overhead is None


@pytest.mark.parametrize("bad", [0, -0.1, "x", True])
def test_invalid_budget(bad):
    with pytest.raises(ValueError, match="Expected `max_overhead` to be a fraction > 0 or None"):
        SlowProbe(cost=0, max_overhead=bad)


def test_lca_every_step_schedule_honours_the_budget(tmp_path):
    from lightning_probes import LossContributionCallback

    runs = {}
    for budget in (None, 1e-9):
        lca = LossContributionCallback(probe_size=32, max_overhead=budget)
        pl.seed_everything(0, verbose=False)
        make_trainer(tmp_path, [lca], max_steps=8).fit(TinyClassifier(), make_loader())
        runs[budget] = (len(lca.history), lca.over_budget_skips)
    # fit-start work already exceeds a 1e-9 budget: every step is skipped, none allocated
    assert runs == {None: (8, 0), 1e-9: (0, 8)}


class PredictedProbe(SlowProbe):
    """States its cost before running: ``forwards`` passes over the probe set plus ``extra`` s."""

    def __init__(self, cost: float, predicted: float | None, **kwargs):
        super().__init__(cost, **kwargs)
        self.predicted = predicted
        self.units = None

    def predict_cost(self, pl_module, data, units):
        self.units = units
        if self.predicted == "raise":
            raise RuntimeError("cannot predict")
        return self.predicted


def test_first_run_waits_until_its_predicted_cost_fits(tmp_path):
    # 0.5 s predicted, 25% budget, >= 20 ms per step: the first run needs >= 2 s of training,
    # i.e. about step 100, so none of 40 steps may run (unpredicted, step 1 would run)
    probe = PredictedProbe(cost=0.0, predicted=0.5, max_overhead=0.25)
    with pytest.warns(UserWarning, match=r"a run is predicted to take 0.50 s"):
        _fit(tmp_path, probe, steps=40)
    assert probe.steps == [] and probe.over_budget_skips == 40
    # the units were measured on this model and its probe set
    assert probe.units.num_samples == 256 and probe.units.num_outputs == 3
    assert probe.units.forward_seconds > 0 and probe.units.flops_per_second > 0
    assert probe.units.bytes_per_second > 0 and probe.units.figure_seconds > 0


def test_first_run_with_a_small_prediction_runs_then_uses_measured_cost(tmp_path):
    # predicted cheap (1 ms), actually 50 ms: the first run starts at once, later runs are
    # predicted by the measured 50 ms and thinned out
    probe = PredictedProbe(cost=0.05, predicted=1e-3, max_overhead=0.25)
    with pytest.warns(UserWarning, match=r"a run is predicted to take"):
        _fit(tmp_path, probe, steps=40)
    # (the first scheduled steps may go to paying for the fit-start work and the calibration)
    assert probe.steps and probe.steps[0] <= 10 and 2 <= len(probe.steps) < 40


def test_a_failing_prediction_falls_back_to_an_unpredicted_first_run(tmp_path):
    probe = PredictedProbe(cost=0.0, predicted="raise", max_overhead=1.0)
    _fit(tmp_path, probe, steps=20)
    assert probe.steps and probe.units is not None


def test_calibrated_units_price_forwards_flops_bytes_and_figures():
    from lightning_probes.core.cost import CostUnits

    units = CostUnits(
        forward_seconds=0.01, num_samples=8, num_outputs=2, flops_per_second=1e9,
        bytes_per_second=1e8, figure_seconds=0.2,
    )  # fmt: skip
    got = units.seconds(forwards=3, flops=2e9, memory_bytes=5e7, figures=2)
    assert got == pytest.approx(0.03 + 2.0 + 0.5 + 0.4)
