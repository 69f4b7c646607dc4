"""The wall-time budget (`max_overhead`): probes skip scheduled runs to stay within it."""

from __future__ import annotations

import re
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


def seconds(text: str) -> float:
    """``"4.0 ms"``, ``"1.25 s"``, ``"3.5 min"`` -> seconds."""
    value, unit = text.split()
    return float(value) * {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}[unit]


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
    # a 1e-9 budget: the first step is allocated (within the first-run allowance), then every
    # step is skipped
    assert runs == {None: (8, 0), 1e-9: (1, 7)}


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
    # 20 s predicted (beyond the 10 s first-run allowance), 25% budget, >= 20 ms per step: the
    # first run needs >= 80 s of training, so none of 40 steps may run
    probe = PredictedProbe(cost=0.0, predicted=20.0, max_overhead=0.25)
    with pytest.warns(UserWarning) as caught:
        _fit(tmp_path, probe, steps=40)
    assert probe.steps == [] and probe.over_budget_skips == 40
    (message,) = [str(w.message) for w in caught if "skipping scheduled runs" in str(w.message)]
    assert (
        "its first run is predicted to take 20.00 s, more than the 10.00 s a first run" in message
    )
    # the numbers the decision was made on: time used, training time, and how long to wait
    match = re.search(
        r"has used (.+) in (.+) of training, so the next run fits after about (.+) more training",
        message,
    )
    assert match is not None, message
    used, training, wait = map(seconds, match.groups())
    assert 0 < used < 1 and 0 < training < 60
    assert training + wait == pytest.approx(4 * (20 + used), rel=0.05)  # (used + 20) / 25%
    # the units were measured on this model and its probe set
    assert probe.units.num_samples == 256 and probe.units.num_outputs == 3
    assert probe.units.forward_seconds > 0 and probe.units.flops_per_second > 0
    assert probe.units.bytes_per_second > 0 and probe.units.figure_seconds > 0


def test_first_run_within_the_allowance_runs_at_once_then_the_budget_throttles(tmp_path):
    # 0.5 s predicted and taken: over a 25% budget of 40 steps (< 2 s), yet admitted first
    # (every probe shows values early); its cost then holds every later run back
    probe = PredictedProbe(cost=0.5, predicted=0.5, max_overhead=0.25)
    with pytest.warns(UserWarning, match=r"the last run took 5\d\d\.\d ms"):
        _fit(tmp_path, probe, steps=40)
    assert probe.steps == [1] and probe.over_budget_skips == 39


def test_the_machine_calibration_is_charged_to_no_probe(tmp_path):
    from lightning_probes.core.cost import clear_machine_rates, machine_calibration_seconds

    clear_machine_rates()
    before = machine_calibration_seconds()
    probe = PredictedProbe(cost=0.0, predicted=1e-3, max_overhead=0.25)
    _fit(tmp_path, probe, steps=2)
    calibration = machine_calibration_seconds() - before
    assert probe.units is not None and calibration > 0
    assert probe.probe_seconds < calibration  # fit-start work and the run: milliseconds


def test_first_run_with_a_small_prediction_runs_then_uses_measured_cost(tmp_path):
    # predicted cheap (1 ms), actually 50 ms: the first run starts at once, later runs are
    # predicted by the measured 50 ms and thinned out
    probe = PredictedProbe(cost=0.05, predicted=1e-3, max_overhead=0.25)
    with pytest.warns(UserWarning, match=r"the last run took"):
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
