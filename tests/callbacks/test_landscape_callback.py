"""LandscapeCallback with a real Trainer: values vs recorded weights, observer, resume."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    RecordingLogger,
    TinyClassifier,
    make_loader,
    make_trainer,
    parameters_and_optimizer_state,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, hessian

from lightning_probes import LandscapeCallback

KEY = "probes/landscape/"


class WeightRecorder(pl.Callback):
    """Independent record of the weights: at the start, before each optimizer step, after it."""

    def __init__(self) -> None:
        self.init: np.ndarray | None = None
        self.before: dict[int, np.ndarray] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    @staticmethod
    def flat(module: nn.Module, prefix: str = "") -> np.ndarray:
        return np.concatenate(
            [
                p.detach().double().numpy().ravel()
                for n, p in module.named_parameters()
                if n.startswith(prefix)
            ]
        )

    def on_train_start(self, trainer, pl_module):
        if self.init is None:
            self.init = self.flat(pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before[trainer.global_step + 1] = self.flat(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }


def fit(tmp_path, callbacks, max_steps=6, module=None, loader=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = module() if module is not None else TinyClassifier()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(module, loader or make_loader())
    return trainer, module


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def eval_loss(module: nn.Module, params: dict[str, torch.Tensor], x, y) -> float:
    clone = copy.deepcopy(module).eval()
    with torch.no_grad():
        for n, p in clone.named_parameters():
            p.copy_(params[n])
        return float(nn.functional.cross_entropy(clone(x), y))


def test_logged_geometry_matches_recorded_weights(tmp_path):
    rec = WeightRecorder()
    probe = LandscapeCallback(every_n_steps=2, plane_every_n_runs=0, probe_size=32)
    trainer, module = fit(tmp_path, [rec, probe])
    logger = trainer.logger
    assert isinstance(logger, RecordingLogger)
    assert logger.steps_of(KEY + "radius") == [2, 4, 6]
    assert logger.steps_of(KEY + "net.3/update_radial_cosine") == [2, 4, 6]
    assert rec.init is not None
    data = probe.probe_set
    for i, step in enumerate([2, 4, 6]):
        now = np.concatenate([p.double().numpy().ravel() for p in rec.after[step].values()])
        got = {k: v[i] for k, v in ((k, logger.values_of(KEY + k)) for k in _QUANTITIES)}
        assert got["radius"] == pytest.approx(np.linalg.norm(now), rel=1e-6)
        assert got["distance_from_init"] == pytest.approx(np.linalg.norm(now - rec.init), rel=1e-5)
        want_angle = math.degrees(math.acos(np.clip(cos(now, rec.init), -1, 1)))
        assert got["angle_from_init"] == pytest.approx(want_angle, rel=1e-4, abs=1e-4)
        assert got["init_radial_cosine"] == pytest.approx(cos(now - rec.init, rec.init), abs=1e-5)
        # the weights before the probed step's optimizer step = after the previous step
        # (independent of the hook the probe uses); the hook-recorded copy agrees
        before = np.concatenate([p.double().numpy().ravel() for p in rec.after[step - 1].values()])
        np.testing.assert_array_equal(before, rec.before[step])
        assert got["update_radial_cosine"] == pytest.approx(cos(now - before, before), abs=1e-5)
        assert got["loss"] == pytest.approx(
            eval_loss(module, rec.after[step], data.inputs, data.targets), rel=1e-5
        )
        # per layer: the layer's own weight and bias only
        layer_now = np.concatenate(
            [rec.after[step][f"net.3.{p}"].double().numpy().ravel() for p in ("weight", "bias")]
        )
        assert logger.values_of(KEY + "net.3/radius")[i] == pytest.approx(
            np.linalg.norm(layer_now), rel=1e-6
        )
    layers = {k.split("/")[2] for _, m in logger.records for k in m if k.endswith("/radius")}
    assert layers == {"radius", "net.0", "net.3", "net.5"}


_QUANTITIES = (
    "radius",
    "distance_from_init",
    "angle_from_init",
    "init_radial_cosine",
    "update_radial_cosine",
    "loss",
)


def test_observer_bit_identical_with_everything_on(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], max_steps=6)
    probe = LandscapeCallback(
        every_n_steps=2,
        plane_resolution=3,
        hessian_top_k=2,
        hessian_iters=6,
        keep_checkpoints=1,
        probe_size=16,
        on_error="raise",
    )
    trainer_b, module_b = fit(tmp_path / "b", [probe], max_steps=6)
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert probe._runs == 3 and probe._before_step is None


def deterministic_module() -> TinyClassifier:
    return TinyClassifier(dropout=0.0)


def test_resume_keeps_initial_weights_and_checkpoints(tmp_path):
    # one full batch per epoch: Lightning restarts a plain DataLoader's iterator on resume, so
    # only then is the data order (and the trajectory) the same as without interruption
    loader = make_loader(batch_size=64, shuffle=False)
    full = LandscapeCallback(
        every_n_steps=2, plane_every_n_runs=0, keep_checkpoints=2, probe_size=16
    )
    trainer_full, _ = fit(
        tmp_path / "full", [full], max_steps=8, module=deterministic_module, loader=loader
    )

    first = LandscapeCallback(
        every_n_steps=2, plane_every_n_runs=0, keep_checkpoints=2, probe_size=16
    )
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(
        tmp_path / "a",
        [first, ckpt],
        max_steps=4,
        module=deterministic_module,
        loader=loader,
        enable_checkpointing=True,
    )
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = raw["callbacks"][first.state_key]
    assert state["runs"] == 2 and state["kept_steps"] == [2, 4]
    assert set(state["init"]) == {n for n, _ in TinyClassifier().named_parameters()}

    resumed = LandscapeCallback(
        every_n_steps=2, plane_every_n_runs=0, keep_checkpoints=2, probe_size=16
    )
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "r", [resumed], max_steps=8)
    trainer.fit(deterministic_module(), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    for name, value in full._init.items():  # type: ignore[union-attr]
        assert torch.equal(resumed._init[name], value)  # type: ignore[index]
    assert [s for s, _ in resumed._kept] == [s for s, _ in full._kept] == [6, 8]
    logger_full, logger_res = trainer_full.logger, trainer.logger
    for q in ("distance_from_init", "angle_from_init", "segment_barrier_lag2", "radius"):
        assert logger_res.steps_of(KEY + q) == [6, 8], q  # type: ignore[union-attr]
        np.testing.assert_allclose(
            logger_res.values_of(KEY + q),  # type: ignore[union-attr]
            logger_full.values_of(KEY + q)[-2:],  # type: ignore[union-attr]
            rtol=1e-6,
            atol=1e-7,
            err_msg=q,
        )


def test_segments_against_interpolated_weights(tmp_path):
    rec = WeightRecorder()
    probe = LandscapeCallback(
        every_n_steps=2, plane_every_n_runs=0, keep_checkpoints=2, segment_points=5, probe_size=32
    )
    trainer, module = fit(tmp_path, [rec, probe])
    logger = trainer.logger
    assert logger.steps_of(KEY + "segment_barrier_lag1") == [4, 6]  # type: ignore[union-attr]
    assert logger.steps_of(KEY + "segment_barrier_lag2") == [6]  # type: ignore[union-attr]
    x, y = probe.probe_set.inputs, probe.probe_set.targets  # type: ignore[union-attr]
    old, now = rec.after[2], rec.after[6]
    losses = [
        eval_loss(module, {k: (1 - t) * old[k] + t * now[k] for k in now}, x, y)
        for t in np.linspace(0, 1, 5)
    ]
    chord = [(1 - t) * losses[0] + t * losses[-1] for t in np.linspace(0, 1, 5)]
    barrier = max(0.0, max(a - b for a, b in zip(losses, chord)))
    assert logger.values_of(KEY + "segment_midpoint_loss_lag2")[0] == pytest.approx(  # type: ignore[union-attr]
        losses[2], rel=1e-5
    )
    assert logger.values_of(KEY + "segment_barrier_lag2")[0] == pytest.approx(  # type: ignore[union-attr]
        barrier, rel=1e-4, abs=1e-6
    )


def test_hessian_short_directions_against_dense_hessian(tmp_path):
    probe = LandscapeCallback(
        at_steps=[3],
        plane_every_n_runs=0,
        hessian_top_k=4,
        hessian_iters=25,
        probe_size=32,
        on_error="raise",
    )
    trainer, module = fit(tmp_path, [probe], max_steps=3, module=lambda: TinyClassifier(hidden=6))
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    sizes = [p.numel() for _, p in module.named_parameters()]
    flat = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    net = copy.deepcopy(module).double().eval()
    x, y = probe.probe_set.inputs.double(), probe.probe_set.targets  # type: ignore[union-attr]

    def loss(vec):
        params = {n: p.reshape(s) for n, p, s in zip(names, torch.split(vec, sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    eigs = torch.linalg.eigvalsh(hessian(loss)(flat)).flip(0)
    logger = trainer.logger
    assert logger.steps_of(KEY + "hessian_max_eigenvalue") == [3]  # type: ignore[union-attr]
    got = logger.values_of(KEY + "hessian_max_eigenvalue")[0]  # type: ignore[union-attr]
    assert got == pytest.approx(float(eigs[0]), rel=1e-3)
    want = int((eigs[:4] > 0.1 * eigs[0]).sum())
    assert logger.values_of(KEY + "short_directions") == [want]  # type: ignore[union-attr]


def test_tensorboard_planes_and_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = LandscapeCallback(
        every_n_steps=2, plane_every_n_runs=2, plane_resolution=4, keep_checkpoints=1, probe_size=16
    )
    fit(tmp_path, [probe], max_steps=6, logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    for tag in ("plane_radial", "plane_random", "plane_radial_contour", "plane_random_contour"):
        assert [e.step for e in acc.Images(KEY + tag)] == [2, 6], tag
    assert [e.step for e in acc.Images(KEY + "segments")] == [4, 6]
    assert KEY + "segments" in tags
    assert [e.step for e in acc.Scalars(KEY + "radius")] == [2, 4, 6]


def test_epoch_schedule_logs_geometry_without_update_cosine(tmp_path):
    probe = LandscapeCallback(every_n_epochs=1, plane_every_n_runs=0, probe_size=16)
    trainer, _ = fit(tmp_path, [probe], max_steps=8)  # 4 batches per epoch
    logger = trainer.logger
    assert logger.steps_of(KEY + "radius") == [4, 8]  # type: ignore[union-attr]
    assert logger.steps_of(KEY + "update_radial_cosine") == []  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"plane_resolution": 1}, "Expected `plane_resolution` to be an int >= 2, got 1"),
        ({"plane_span": 0.0}, "Expected `plane_span` to be > 0, got 0.0"),
        ({"planes": ("radial", "pca")}, "`planes` can contain 'radial' and 'random', got"),
        ({"one_dim": "keep"}, "`one_dim` can be 'zero', 'weights' or 'norm', got 'keep'"),
        ({"hessian_top_k": 0}, "Expected `hessian_top_k` to be None or an int >= 1, got 0"),
        (
            {"hessian_top_k": 5, "hessian_iters": 3},
            "Expected `hessian_iters` to be None or an int >= `hessian_top_k`, got 3",
        ),
        ({"hessian_threshold_mode": "abs"}, "`hessian_threshold_mode` can be 'relative' or"),
        ({"keep_checkpoints": -1}, "Expected `keep_checkpoints` to be an int >= 0, got -1"),
        ({"plane_every_n_runs": 1.5}, "Expected `plane_every_n_runs` to be an int >= 0, got 1.5"),
        ({"checkpoint_every_n_runs": 0}, "Expected `checkpoint_every_n_runs` to be an int >= 1"),
        ({"segment_points": 4}, "Expected `segment_points` to be an odd int >= 3, got 4"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LandscapeCallback(**kwargs)


def test_unknown_layer_lists_available(tmp_path):
    with pytest.raises(ValueError, match=r"Layer 'net.9' not found .* net.0 \(Linear\)"):
        fit(tmp_path, [LandscapeCallback(layers="net.9")], max_steps=1)


def test_radial_plane_image_passes_through_current_weights_and_origin(tmp_path, monkeypatch):
    from lightning_probes import logging as plog

    images: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(plog, "log_image", lambda trainer, key, img: images.setdefault(key, img))
    rec = WeightRecorder()
    probe = LandscapeCallback(at_steps=[4], plane_resolution=5, probe_size=32, on_error="raise")
    trainer, module = fit(tmp_path, [rec, probe], max_steps=4)
    radial = images[KEY + "plane_radial"]  # log-loss, [b, a] with b increasing upwards
    assert radial.shape == (5, 5) and images[KEY + "plane_random"].shape == (5, 5)
    x, y = probe.probe_set.inputs, probe.probe_set.targets  # type: ignore[union-attr]
    here = eval_loss(module, rec.after[4], x, y)
    # grid [-1, -0.5, 0, 0.5, 1]: centre pixel = current weights, (a=-1, b=0) = the origin,
    # where every logit is 0 and the cross-entropy is ln(3) for 3 classes
    assert float(radial[2, 2]) == pytest.approx(math.log(here), rel=1e-5)
    assert float(radial[2, 0]) == pytest.approx(math.log(math.log(3)), rel=1e-5)
    twice = {k: 2 * v for k, v in rec.after[4].items()}  # a = +1, b = 0: 2θ
    assert float(radial[2, 4]) == pytest.approx(math.log(eval_loss(module, twice, x, y)), rel=1e-5)
    assert float(images[KEY + "plane_random"][2, 2]) == pytest.approx(math.log(here), rel=1e-5)


def test_per_layer_drift_and_update_cosine(tmp_path):
    rec = WeightRecorder()
    probe = LandscapeCallback(every_n_steps=3, plane_every_n_runs=0, probe_size=16)
    trainer, module = fit(tmp_path, [rec, probe])
    logger = trainer.logger
    prefix = "net.0"
    pl.seed_everything(0, verbose=False)  # as in fit(): the same initial weights
    init = WeightRecorder.flat(TinyClassifier(), prefix + ".")
    for i, step in enumerate([3, 6]):
        now = np.concatenate(
            [rec.after[step][f"{prefix}.{p}"].double().numpy().ravel() for p in ("weight", "bias")]
        )
        values = {
            q: logger.values_of(f"{KEY}{prefix}/{q}")[i]  # type: ignore[union-attr]
            for q in ("distance_from_init", "angle_from_init", "update_radial_cosine")
        }
        assert values["distance_from_init"] == pytest.approx(np.linalg.norm(now - init), rel=1e-5)
        want = math.degrees(math.acos(np.clip(cos(now, init), -1, 1)))
        assert values["angle_from_init"] == pytest.approx(want, rel=1e-4, abs=1e-4)
        prev = np.concatenate(
            [
                rec.after[step - 1][f"{prefix}.{p}"].double().numpy().ravel()
                for p in ("weight", "bias")
            ]
        )
        assert values["update_radial_cosine"] == pytest.approx(cos(now - prev, prev), abs=1e-5)
