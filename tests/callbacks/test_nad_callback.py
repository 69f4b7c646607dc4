"""NADCallback with a real Trainer: what is logged when, observer, resume, TensorBoard."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer, parameters_and_optimizer_state
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.func import jacrev
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes import NADCallback


def fit(tmp_path, callbacks, max_steps=4, module=None, loader=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = module() if module is not None else TinyClassifier(dropout=0.0)
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(module, loader or make_loader(shuffle=False))
    return trainer, module


def _naive_shares(model, x, directions, top):
    """Energy shares by explicit loops over samples and NADs, in float64."""
    u = directions.reshape(directions.shape[0], -1).double()
    xs = x.reshape(x.shape[0], -1).double()
    data = torch.stack([torch.stack([(xi @ ui) ** 2 for ui in u]) for xi in xs]).mean(0)
    model = model.double().eval()
    jac = torch.stack([jacrev(lambda z: model(z[None])[0])(xi) for xi in x.double()])
    grad = torch.stack(
        [(jac.reshape(x.shape[0], -1, u.shape[1]) @ ui).square().sum(-1).mean() for ui in u]
    )
    return (
        float(data[:top].sum() / xs.square().sum(1).mean()),
        float(grad[:top].sum().detach() / jac.square().sum((1, 2)).mean().detach()),
    )


def test_logs_at_fit_start_and_on_schedule_with_values_from_a_naive_reference(tmp_path):
    cb = NADCallback(num_networks=64, top_k=2, every_n_steps=2, probe_size=24)
    trainer, module = fit(tmp_path, [cb], max_steps=4)
    logger = trainer.logger
    assert logger.steps_of("probes/nad/spectrum_share_top") == [0]
    for key in ("data_energy_share_top", "grad_energy_share_top", "grad_energy_centroid"):
        assert logger.steps_of(f"probes/nad/{key}") == [2, 4]
    nads = cb.nads
    assert nads.directions.shape == (8, 8) and nads.num_networks == 64
    torch.testing.assert_close(
        nads.directions @ nads.directions.T, torch.eye(8, dtype=nads.directions.dtype)
    )
    share = float(nads.singular_values[:2].square().sum() / nads.singular_values.square().sum())
    assert logger.values_of("probes/nad/spectrum_share_top")[0] == pytest.approx(share, rel=1e-5)
    data_share, grad_share = _naive_shares(module, cb.probe_set.inputs, nads.directions, top=2)
    assert logger.values_of("probes/nad/data_energy_share_top")[-1] == pytest.approx(
        data_share, rel=1e-5
    )
    assert logger.values_of("probes/nad/grad_energy_share_top")[-1] == pytest.approx(
        grad_share, rel=1e-5
    )
    assert 0.0 <= logger.values_of("probes/nad/grad_energy_centroid")[-1] <= 1.0


def test_observer_identical_weights_and_default_factory_leaves_model(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], module=TinyClassifier, max_steps=6)
    cb = NADCallback(num_networks=16, every_n_steps=2, probe_size=16)
    trainer_b, module_b = fit(tmp_path / "b", [cb], module=TinyClassifier, max_steps=6)
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_loads_the_basis_instead_of_recomputing(tmp_path):
    calls = []

    def factory():
        calls.append(1)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def make(**kw):
        return NADCallback(factory, num_networks=20, every_n_steps=2, probe_size=16, **kw)

    full = make()
    trainer_full, _ = fit(tmp_path / "full", [full], max_steps=8)
    assert len(calls) == 20
    first = make()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(tmp_path / "first", [first, ckpt], max_steps=4, enable_checkpointing=True)
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert torch.equal(raw["callbacks"][first.state_key]["directions"], first.nads.directions)
    calls.clear()
    resumed = make()
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "resumed", [resumed], max_steps=8)
    trainer.fit(
        TinyClassifier(dropout=0.0),
        make_loader(shuffle=False),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
    )
    assert calls == []  # not recomputed
    assert torch.equal(resumed.nads.directions, full.nads.directions)
    assert trainer.logger.steps_of("probes/nad/spectrum_share_top") == []
    assert trainer.logger.steps_of("probes/nad/grad_energy_share_top") == [6, 8]
    # the data's energy depends only on the probe set and the basis: same as uninterrupted
    # (the weights are not: Lightning's resume from an end-of-epoch checkpoint differs)
    key = "probes/nad/data_energy_share_top"
    assert trainer.logger.values_of(key) == trainer_full.logger.values_of(key)[-2:]


def test_images_histograms_and_figures_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class SmallCNN(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)
            )

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = NADCallback(num_networks=24, num_images=4, every_n_steps=2, probe_size=16)
    fit(tmp_path, [cb], module=SmallCNN, loader=DataLoader(data, batch_size=8), logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"probes/nad/directions", "probes/nad/directions_fourier", "probes/nad/spectrum"} <= set(
        tags["images"]
    )
    assert [e.step for e in acc.Images("probes/nad/energy")] == [2, 4]
    hist = acc.Histograms("probes/nad/grad_energy")
    assert [e.step for e in hist] == [2, 4]
    assert len(hist[0].histogram_value.bucket) == 24 - 1  # one bucket per NAD index
    assert cb.nads.directions.shape == (23, 1, 8, 8)


def test_input_shape_is_checked_against_the_probe_set(tmp_path):
    cb = NADCallback(num_networks=4, input_shape=(3, 4), probe_size=8)
    with pytest.raises(ValueError, match=r"Expected probe inputs of `input_shape` \(3, 4\), got"):
        fit(tmp_path, [cb], max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_factory": 3}, TypeError, "Expected `model_factory` to be a callable"),
        ({"num_networks": 1}, ValueError, "Expected `num_networks` to be an int >= 2, got 1"),
        ({"k": 0}, ValueError, "Expected `k` to be a positive int or None, got 0"),
        ({"top_k": 1.5}, ValueError, "Expected `top_k` to be a positive int or None, got 1.5"),
        ({"method": "jvp"}, ValueError, "`method` can be 'secant' or 'autograd', got 'jvp'"),
        ({"step": -1.0}, ValueError, "Expected `step` to be a positive float, got -1.0"),
        ({"num_images": -1}, ValueError, "Expected `num_images` to be an int >= 0, got -1"),
        ({"input_shape": (0, 2)}, ValueError, "Expected `input_shape` to be a sequence of pos"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        NADCallback(**kwargs)


def test_state_key_depends_on_configuration():
    assert NADCallback(num_networks=8).state_key != NADCallback(num_networks=9).state_key
    assert NADCallback(num_networks=8).state_key == NADCallback(num_networks=8).state_key


def test_under_a_budget_the_basis_is_computed_by_the_first_admitted_run(tmp_path):
    eager = NADCallback(num_networks=32, every_n_steps=3, probe_size=24, max_overhead=None)
    trainer, _ = fit(tmp_path, [eager], max_steps=6)
    assert trainer.logger.steps_of("probes/nad/spectrum_share_top") == [0]
    # a budget that always admits: the basis waits for the first scheduled run (step 3) and
    # is the same basis, since it depends only on the architecture and the seed
    lazy = NADCallback(num_networks=32, every_n_steps=3, probe_size=24, max_overhead=1e6)
    trainer, _ = fit(tmp_path, [lazy], max_steps=6)
    assert trainer.logger.steps_of("probes/nad/spectrum_share_top") == [3]
    assert trainer.logger.steps_of("probes/nad/data_energy_share_top") == [3, 6]
    torch.testing.assert_close(lazy.nads.directions, eager.nads.directions)

    # a budget that never admits, without a first-run allowance: no basis is computed at all,
    # and nothing is logged
    class Strict(NADCallback):
        first_run_allowance = 0.0

    never = Strict(num_networks=32, every_n_steps=3, probe_size=24, max_overhead=1e-9)
    with pytest.warns(UserWarning, match="Strict: skipping scheduled runs"):
        trainer, _ = fit(tmp_path, [never], max_steps=6)
    assert never.nads is None and never.runs == 0 and never.over_budget_skips == 2
    assert trainer.logger.steps_of("probes/nad/spectrum_share_top") == []
