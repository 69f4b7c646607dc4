"""Shared work: one probe set per trainer and settings, one pre-step weight snapshot per step."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from conftest import RecordingLogger, TinyClassifier, make_loader, make_trainer
from torch import nn

from lightning_probes import LandscapeCallback, LossContributionCallback
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.shared import SharedWork, WeightSnapshot, shared_work
from lightning_probes.core.data import draw_probe_set


class Recorder(ProbeCallback):
    """Records the probe set it was given at every run."""

    probe_name = "recorder"
    default_schedule = {"every_n_steps": 1}

    def __init__(self, tag, **kwargs):
        super().__init__(**kwargs)
        self.tag = tag
        self.seen = []

    def _state_key_config(self):
        return {**super()._state_key_config(), "tag": self.tag}

    def probe(self, trainer, pl_module, data):
        self.seen.append(data)


def _fit(tmp_path, callbacks, steps=4, logger=None):
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier()
    loader = make_loader()
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps, logger=logger)
    trainer.fit(module, loader)
    return trainer, loader


def test_probes_with_the_same_settings_share_one_probe_set(tmp_path):
    a, b = Recorder(2, probe_size=20, seed=3), Recorder(3, probe_size=20, seed=3)
    trainer, loader = _fit(tmp_path, [a, b])
    work = shared_work(trainer)
    assert work.draws == 1 and work.device_copies == 1
    # one set of tensors, bit-identical to the draw each probe made on its own before
    assert a.probe_set.inputs is b.probe_set.inputs and a.probe_set.targets is b.probe_set.targets
    alone = draw_probe_set(loader, 20, seed=3)
    assert torch.equal(a.probe_set.inputs, alone.inputs)
    assert torch.equal(a.probe_set.targets, alone.targets)
    # each probe holds its own ProbeSet: replacing one's leaves the other's as it was
    assert a.probe_set is not b.probe_set
    inputs = b.probe_set.inputs
    a._probe_set = None
    assert b.probe_set.inputs is inputs
    # released at fit end
    assert work.num_cached == 0


def test_different_settings_never_share(tmp_path):
    probes = [
        Recorder(4, probe_size=20, seed=3),
        Recorder(5, probe_size=20, seed=4),
        Recorder(6, probe_size=24, seed=3),
        Recorder(7, probe_size=20, seed=3, batch_to_inputs_targets=lambda b: (b[0], b[1])),
    ]
    trainer, loader = _fit(tmp_path, probes)
    assert shared_work(trainer).draws == 4
    inputs = [p.probe_set.inputs for p in probes]
    assert all(x is not y for i, x in enumerate(inputs) for y in inputs[i + 1 :])
    assert not torch.equal(inputs[0], inputs[1])
    for probe in probes:
        alone = draw_probe_set(
            loader,
            probe.probe_size,
            seed=probe.seed,
            batch_to_inputs_targets=probe.batch_to_inputs_targets,
        )
        assert torch.equal(probe.probe_set.inputs, alone.inputs)


def test_user_given_tensors_are_moved_once(tmp_path):
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    a, b = Recorder(8, probe_data=(x, y)), Recorder(9, probe_data=(x, y))
    trainer, _ = _fit(tmp_path, [a, b], steps=2)
    assert shared_work(trainer).device_copies == 1 and shared_work(trainer).draws == 0
    assert a.probe_set.inputs is b.probe_set.inputs
    assert torch.equal(a.probe_set.inputs, x)


def _lca_and_landscape(**landscape):
    lca = LossContributionCallback(method="simpson", probe_size=32, seed=1)
    scape = LandscapeCallback(
        probe_size=32, seed=1, plane_every_n_runs=0, every_n_steps=2, **landscape
    )
    return lca, scape


def test_lca_and_landscape_share_the_pre_step_snapshot_and_log_the_same_numbers(tmp_path):
    runs = {}
    for name in ("lca", "landscape", "both"):
        lca, scape = _lca_and_landscape()
        callbacks = {"lca": [lca], "landscape": [scape], "both": [lca, scape]}[name]
        logger = RecordingLogger()
        trainer, _ = _fit(tmp_path / name, callbacks, steps=6, logger=logger)
        runs[name] = (lca, scape, logger, shared_work(trainer))
    lca_alone, _, _, work_lca = runs["lca"]
    _, _, log_scape, work_scape = runs["landscape"]
    lca, _, log_both, work = runs["both"]
    # LCA instruments every step and keeps θ_{t+1} as the next θ_t: one copy, at step 1; the
    # landscape probe alone copies at each of its 3 steps; together, LCA's copy serves both
    assert work_lca.weight_copies == 1 and work_scape.weight_copies == 3
    assert work.weight_copies == 1
    # the same numbers as each probe alone: nobody wrote into the shared snapshot
    assert torch.equal(lca.history, lca_alone.history)
    for k, v in lca_alone.cumulative_lc.items():
        assert torch.equal(lca.cumulative_lc[k], v), k
    key = "probes/landscape/update_radial_cosine"
    assert log_both.values_of(key) == log_scape.values_of(key) and len(log_scape.values_of(key))
    assert log_both.steps_of(key) == log_scape.steps_of(key) == [2, 4, 6]
    # both share the probe set too (same size and seed)
    assert work.draws == 1 and work.device_copies == 1


def test_cold_steps_copy_once_for_both_probes(tmp_path):
    # LCA instruments only the landscape's steps: no kept θ, one fresh copy per step for both
    lca = LossContributionCallback(method="simpson", probe_size=32, at_steps=[2, 4])
    scape = LandscapeCallback(probe_size=32, plane_every_n_runs=0, at_steps=[2, 4])
    trainer, _ = _fit(tmp_path, [scape, lca], steps=5)
    assert shared_work(trainer).weight_copies == 2
    assert lca.history.shape[0] == 2 and scape.runs == 2


def _params(model):
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def test_snapshot_is_one_per_step_and_offered_copies_are_checked():
    model = nn.Linear(3, 2)
    work = SharedWork()
    first = work.before_step(model, 1)
    assert work.before_step(model, 1) is first and work.weight_copies == 1
    assert first.equals(_params(model)) and first.step == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    kept = WeightSnapshot.copy_of(_params(model))
    work.offer(kept)
    assert work.before_step(model, 2) is kept and kept.step == 2 and work.weight_copies == 1
    work.offer(kept)
    with torch.no_grad():  # moved outside the optimizer: the offered copy is stale
        model.weight.add_(1.0)
    fresh = work.before_step(model, 3)
    assert fresh is not kept and fresh.equals(_params(model)) and work.weight_copies == 2
    # a probe changing its own reference does not touch the snapshot another probe holds
    before = {k: v.clone() for k, v in fresh.tensors.items()}
    other = fresh
    fresh = None
    assert all(torch.equal(other.tensors[k], v) for k, v in before.items())


def test_snapshots_are_held_weakly_and_read_only_mappings():
    model = nn.Linear(3, 2)
    work = SharedWork()
    snap = work.before_step(model, 1)
    try:
        snap.tensors["weight"] = torch.zeros(2, 3)  # type: ignore[index]
        raise AssertionError("the mapping must be read-only")
    except TypeError:
        pass
    del snap  # no probe holds it any more: the next ask at the same step copies again
    work.before_step(model, 1)
    assert work.weight_copies == 2


def test_probes_given_the_same_dataset_share_its_collated_copy(tmp_path):
    from conftest import make_data

    dataset = make_data(n=12)
    a, b = Recorder(20, probe_data=dataset), Recorder(21, probe_data=dataset)
    assert a.probe_set.inputs is not b.probe_set.inputs  # each collated it in __init__
    trainer, _ = _fit(tmp_path, [a, b], steps=2)
    assert a.probe_set.inputs is b.probe_set.inputs and shared_work(trainer).device_copies == 1
    assert torch.equal(a.probe_set.inputs, dataset.tensors[0])
