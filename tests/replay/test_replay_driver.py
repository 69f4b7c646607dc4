"""replay_checkpoints: the same values as live at the same steps; LCA and landscape segments
between checkpoints against float64 references written here."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import RecordingLogger, TinyClassifier, make_data, make_loader, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call

from lightning_probes import (
    AblationAUCCallback,
    LandscapeCallback,
    LayerCKACallback,
    LossContributionCallback,
    SelectivityCallback,
)
from lightning_probes.replay import find_checkpoints, load_checkpoint, replay_checkpoints

EVERY, STEPS = 2, 6


class TanhClassifier(TinyClassifier):
    """A smooth loss along every segment (tanh), so a fine trapezoid is an exact reference."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.net[1] = nn.Tanh()
        self.net[4] = nn.Tanh()


def probe_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_data(n, seed=1).tensors
    return x, y


def stateless_probes(**kw):
    return [
        AblationAUCCallback(num_orderings=3, num_points=5, **kw),
        SelectivityCallback(**kw),
        LayerCKACallback(**kw),
    ]


def train(tmp_path, module, callbacks=(), logger=None):
    """Fit ``module`` for STEPS steps, a checkpoint every EVERY steps; the checkpoint folder."""
    folder = tmp_path / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=EVERY)
    trainer = make_trainer(
        tmp_path, [*callbacks, ckpt], max_steps=STEPS, logger=logger, enable_checkpointing=True
    )
    trainer.fit(module, make_loader())
    return folder


def by_step(logger: RecordingLogger, prefix: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for step, metrics in logger.records:
        for key, value in metrics.items():
            if key.startswith(prefix):
                out.setdefault(step, {})[key] = value
    return out


def test_stateless_probes_replayed_equal_live(tmp_path):
    pl.seed_everything(0, verbose=False)
    live = RecordingLogger()
    folder = train(
        tmp_path, TinyClassifier(), stateless_probes(every_n_steps=EVERY, probe_data=probe_data()),
        logger=live,
    )  # fmt: skip
    replayed = RecordingLogger()
    result = replay_checkpoints(
        TinyClassifier, folder, stateless_probes(), probe_data=probe_data(), logger=replayed
    )
    assert result.steps == [2, 4, 6]
    assert result.runs == {"ablation": 3, "selectivity": 3, "cka": 3}
    for probe in ("ablation", "selectivity", "cka"):
        want, got = by_step(live, f"probes/{probe}/"), by_step(replayed, f"probes/{probe}/")
        assert sorted(got) == [2, 4, 6] == sorted(want), probe
        for step in want:
            assert got[step].keys() == want[step].keys(), (probe, step)
            for key, value in want[step].items():
                assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)


def test_probe_set_drawn_from_the_train_loader_as_live(tmp_path):
    pl.seed_everything(0, verbose=False)
    live = RecordingLogger()
    probe = LayerCKACallback(every_n_steps=EVERY, probe_size=20)  # drawn from the loader
    folder = train(tmp_path, TinyClassifier(), [probe], logger=live)
    replayed = RecordingLogger()
    replay_checkpoints(
        TinyClassifier, folder, [LayerCKACallback(probe_size=20)],
        train_dataloader=make_loader(), logger=replayed,
    )  # fmt: skip
    want, got = by_step(live, "probes/cka/"), by_step(replayed, "probes/cka/")
    assert sorted(got) == [2, 4, 6]
    for step in want:
        for key, value in want[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)


def reference_loss_and_lc(sd_a, sd_b, x, y, points=2001):
    """Float64: L(θ_a), L(θ_b) and Δ_i ∫_0^1 ∂_i L(θ_a + tΔ) dt by an even-spaced trapezoid."""
    model = TanhClassifier().double().eval()
    names = [n for n, _ in model.named_parameters()]
    a = {n: sd_a[n].double() for n in names}
    delta = {n: sd_b[n].double() - a[n] for n in names}
    t = torch.linspace(0, 1, points, dtype=torch.float64)
    path = {n: a[n] + t.view(-1, *[1] * a[n].ndim) * delta[n] for n in names}  # [points, ...]

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x.double(),)), y)

    grads = torch.func.vmap(torch.func.grad(loss))(path)
    losses = torch.func.vmap(loss)(path)
    weights = torch.ones(points, dtype=torch.float64)
    weights[[0, -1]] = 0.5
    lc = {n: delta[n] * torch.tensordot(weights, grads[n], dims=1) / (points - 1) for n in names}
    return float(losses[0]), float(losses[-1]), lc


@pytest.fixture(scope="module")
def tanh_checkpoints(tmp_path_factory):
    """The checkpoint folder of one TanhClassifier run (steps 2, 4, 6)."""
    pl.seed_everything(0, verbose=False)
    return train(tmp_path_factory.mktemp("tanh"), TanhClassifier())


def test_lca_segment_is_the_straight_line_path_integral(tanh_checkpoints):
    folder = tanh_checkpoints
    x, y = probe_data()
    logger = RecordingLogger()
    lca = LossContributionCallback(tolerance=1e-7, max_splits=64, chunk_size=None)
    result = replay_checkpoints(TanhClassifier, folder, [lca], probe_data=(x, y), logger=logger)
    assert logger.steps_of("probes/lca/lc") == [4, 6]  # one segment per checkpoint pair
    paths = [c.path for c in find_checkpoints(folder)]
    sd_a, sd_b = (load_checkpoint(p)["state_dict"] for p in paths[:2])
    loss_a, loss_b, lc = reference_loss_and_lc(sd_a, sd_b, x, y)
    logged = by_step(logger, "probes/lca/")[4]
    for layer in ("net.0", "net.3", "net.5"):
        want = sum(float(v.sum()) for k, v in lc.items() if k.startswith(layer + "."))
        assert logged[f"probes/lca/{layer}/lc"] == pytest.approx(want, rel=1e-4, abs=1e-7), layer
    # the allocation sums to the loss change between the checkpoints, up to the logged error
    true_delta = loss_b - loss_a
    assert logged["probes/lca/true_delta_loss"] == pytest.approx(true_delta, rel=1e-4, abs=1e-7)
    assert logged["probes/lca/lc"] == pytest.approx(true_delta, rel=1e-4, abs=1e-7)
    err = abs(logged["probes/lca/lc"] - logged["probes/lca/true_delta_loss"])
    assert err == pytest.approx(logged["probes/lca/error"], abs=1e-9)
    assert logged["probes/lca/loss"] == pytest.approx(loss_b, rel=1e-5)
    (seg, _) = result.lca_segments()
    assert (seg["start"], seg["end"]) == (2, 4) and seg["error"] <= 1e-7


def test_landscape_segment_between_consecutive_checkpoints(tanh_checkpoints):
    folder = tanh_checkpoints
    x, y = probe_data()
    logger = RecordingLogger()
    probe = LandscapeCallback(keep_checkpoints=1, plane_every_n_runs=0, segment_points=5)
    replay_checkpoints(TanhClassifier, folder, [probe], probe_data=(x, y), logger=logger)
    key = "probes/landscape/segment_midpoint_loss_lag1"
    assert logger.steps_of(key) == [4, 6]
    # one optimizer step's cosine is not a chord's: never logged for checkpoints 2 steps apart
    assert not logger.steps_of("probes/landscape/update_radial_cosine")
    paths = [c.path for c in find_checkpoints(folder)]
    sds = [load_checkpoint(p)["state_dict"] for p in paths]
    model = TanhClassifier().double().eval()
    for (step, value), sd_a, sd_b in zip(zip([4, 6], logger.values_of(key)), sds, sds[1:]):
        mid = {k: (sd_a[k].double() + sd_b[k].double()) / 2 for k in sd_a}
        want = nn.functional.cross_entropy(functional_call(model, mid, (x.double(),)), y)
        assert value == pytest.approx(float(want), rel=1e-5), step
    origin = by_step(logger, "probes/landscape/distance_from_init")
    assert origin[2]["probes/landscape/distance_from_init"] == 0.0  # θ_0: the first checkpoint


def test_integration_error_above_tolerance_is_reported(tanh_checkpoints):
    folder = tanh_checkpoints
    lca = LossContributionCallback(method="first_order", tolerance=1e-9)
    with pytest.warns(UserWarning, match="misses the loss change by more than tolerance"):
        result = replay_checkpoints(
            TanhClassifier, folder, [lca], probe_data=probe_data(), logger=RecordingLogger()
        )
    assert "integration error" in result.summary()


class SaveInitial(pl.Callback):
    """Saves the initial weights at step 0 (ModelCheckpoint never does)."""

    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


def test_checkpoint_at_step_zero_is_the_initialisation(tmp_path):
    pl.seed_everything(0, verbose=False)
    folder = train(
        tmp_path, TanhClassifier(), [SaveInitial(tmp_path / "checkpoints" / "init.ckpt")]
    )
    logger = RecordingLogger()
    probes = [LossContributionCallback(), LandscapeCallback(plane_every_n_runs=0)]
    result = replay_checkpoints(
        TanhClassifier, folder, probes, probe_data=probe_data(), logger=logger
    )
    assert result.steps == [0, 2, 4, 6]
    assert logger.steps_of("probes/lca/lc") == [2, 4, 6]  # the first segment starts at step 0
    assert logger.steps_of("probes/landscape/distance_from_init") == [2, 4, 6]
    first = by_step(logger, "probes/landscape/distance_from_init")[2]
    init = load_checkpoint(folder / "init.ckpt")["state_dict"]
    at_2 = load_checkpoint(find_checkpoints(folder)[1].path)["state_dict"]
    want = torch.cat([(at_2[k] - init[k]).flatten() for k in init]).double().norm()
    assert first["probes/landscape/distance_from_init"] == pytest.approx(float(want), rel=1e-5)


def test_lightning_namespace_and_the_models_trainer_given_back(tmp_path):
    lightning = pytest.importorskip("lightning.pytorch")
    from lightning_probes.lightning import AblationAUCCallback as Ablation

    class Module(lightning.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ckpt = lightning.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1, every_n_train_steps=2)
    trainer = lightning.Trainer(
        max_steps=4, logger=False, callbacks=[ckpt], accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module = Module(hidden=12)
    trainer.fit(module, make_loader())
    logger = RecordingLogger()
    result = replay_checkpoints(
        Module, tmp_path, [Ablation()], probe_data=probe_data(), logger=logger
    )
    assert isinstance(result.trainer, lightning.Trainer)
    assert logger.steps_of("probes/ablation/auc") == [2, 4]  # built with hidden=12 from hparams
    replay_checkpoints(module, tmp_path, [Ablation()], probe_data=probe_data(), logger=logger)
    assert module.trainer is trainer
