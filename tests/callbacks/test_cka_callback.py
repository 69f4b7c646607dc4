"""LayerCKACallback with a real Trainer: what is logged when, observer, resume, figures."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    TinyClassifier,
    make_loader,
    make_trainer,
    parameters_and_optimizer_state,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from lightning_probes import LayerCKACallback
from lightning_probes.core.kernels import layer_tangent_kernels
from lightning_probes.functional.alignment import center_kernel, kernel_label_alignment

LAYERS = ["net.0", "net.3", "net.5"]


def fit(tmp_path, callbacks, max_steps=6, module=TinyClassifier, shuffle=True, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(model, make_loader(shuffle=shuffle))
    return trainer, model


class Recorder(pl.Callback):
    """Independent reference: kernels at each step from layer_tangent_kernels + functional."""

    def __init__(self, probe):
        self.probe = probe
        self.values = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        data = self.probe.probe_set
        if trainer.global_step % 2 or data is None:
            return
        training = pl_module.training
        pl_module.eval()
        net = pl_module.double()
        kernels = layer_tangent_kernels(net, data.inputs.double(), layers=LAYERS)
        pl_module.float().train(training)
        for name, K in kernels.items():
            Kc = center_kernel(K, 3)
            ev = torch.linalg.eigvalsh(Kc).abs().max()
            self.values[(trainer.global_step, name)] = {
                "alignment": float(kernel_label_alignment(K, data.targets, 3)),
                "trace": float(K.trace()),
                "stable_rank": float(Kc.square().sum() / ev**2),
            }


def test_logged_values_and_steps_match_an_independent_reference(tmp_path):
    probe = LayerCKACallback(every_n_steps=2, probe_size=24)
    # the recorder runs before the probe at the same hook, on the same weights
    rec = Recorder(probe)
    trainer, _ = fit(tmp_path, [rec, probe], max_steps=6)
    logger = trainer.logger
    assert logger.steps_of("probes/cka/net.0/alignment") == [2, 4, 6]
    for step in (2, 4, 6):
        for name in LAYERS:
            for q in ("alignment", "trace", "stable_rank"):
                got = [
                    m[f"probes/cka/{name}/{q}"]
                    for s, m in logger.records
                    if s == step and f"probes/cka/{name}/{q}" in m
                ]
                assert len(got) == 1
                np.testing.assert_allclose(got[0], rec.values[(step, name)][q], rtol=2e-4)
    steps, hist = probe.history
    assert steps == [2, 4, 6] and hist.shape == (3, 3)
    peak = logger.values_of("probes/cka/peak_layer_index")
    assert peak == [float(np.argmax(row)) for row in hist]
    np.testing.assert_allclose(
        logger.values_of("probes/cka/peak_alignment"), hist.max(1), rtol=1e-6
    )
    assert "probes/cka/net.3/alignment" in trainer.callback_metrics


def test_observer_bit_identical_training(tmp_path):
    trainer_a, module_a = fit(tmp_path / "a", [], max_steps=6)
    trainer_b, module_b = fit(
        tmp_path / "b", [LayerCKACallback(every_n_steps=1, probe_size=16)], max_steps=6
    )
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not any(m._forward_hooks for m in module_b.modules())


def deterministic():
    # no dropout and no shuffling: training after a resume does not depend on the global RNG
    return TinyClassifier(dropout=0.0)


def test_resume_restores_the_alignment_history(tmp_path):
    full = LayerCKACallback(every_n_steps=2, probe_size=16)
    fit(tmp_path / "full", [full], max_steps=8, module=deterministic, shuffle=False)

    first = LayerCKACallback(every_n_steps=2, probe_size=16)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(tmp_path / "first", [first, ckpt], max_steps=4, module=deterministic, shuffle=False,
        enable_checkpointing=True)  # fmt: skip
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    state = raw["callbacks"][first.state_key]
    assert state["steps"].tolist() == [2, 4] and state["layer_names"] == LAYERS

    resumed = LayerCKACallback(every_n_steps=2, probe_size=16)
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "second", [resumed], max_steps=8)
    trainer.fit(
        deterministic(), make_loader(shuffle=False), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    steps_full, hist_full = full.history
    steps, hist = resumed.history
    assert steps == steps_full == [2, 4, 6, 8]
    # the rows before the interruption come from the checkpoint, bit for bit
    np.testing.assert_array_equal(hist[:2], hist_full[:2])
    np.testing.assert_array_equal(hist[:2], state["alignments"].numpy())
    # (Lightning's own resume is not bit-exact for the weights, so later rows are checked
    # against an independent computation on the resumed model's final weights)
    model = trainer.lightning_module.double().eval()
    data = resumed.probe_set
    kernels = layer_tangent_kernels(model, data.inputs.double(), layers=LAYERS)
    last = [float(kernel_label_alignment(kernels[k], data.targets, 3)) for k in LAYERS]
    np.testing.assert_allclose(hist[3], last, rtol=1e-4)


def test_tensorboard_figures_text_and_kernel_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    probe = LayerCKACallback(every_n_steps=2, probe_size=16, log_kernels=True, layers="net.[03]")
    fit(tmp_path, [probe], max_steps=4, logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = acc.Tags()["images"]
    for tag in ("probes/cka/alignment_vs_layer", "probes/cka/alignment_hierarchy",
                "probes/cka/net.0/kernel", "probes/cka/net.3/kernel"):  # fmt: skip
        assert tag in images, images
        assert [e.step for e in acc.Images(tag)] == [2, 4]
    assert "probes/cka/net.5/kernel" not in images
    assert any("peak_layer" in t for t in acc.Tags()["tensors"])
    assert [e.step for e in acc.Scalars("probes/cka/net.0/alignment")] == [2, 4]


def test_chunked_and_hutchinson_modes_log_alignment(tmp_path):
    exact = LayerCKACallback(at_steps=[3], probe_size=20, log_figures=False)
    chunked = LayerCKACallback(
        at_steps=[3], probe_size=20, chunk_size=6, stable_rank=False, log_figures=False
    )
    hutch = LayerCKACallback(
        at_steps=[3], probe_size=20, estimator="hutchinson", num_probes=64, log_figures=False
    )
    trainer, _ = fit(tmp_path, [exact, chunked, hutch], max_steps=3)
    a, b, c = (cb.history[1][0] for cb in (exact, chunked, hutch))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    np.testing.assert_allclose(c, a, rtol=0.35)
    assert "probes/cka/net.0/stable_rank" in trainer.callback_metrics


class BNConvNet(TinyClassifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (2, 4)), nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(16, 3),
        )  # fmt: skip


def test_cnn_with_batchnorm_runs_in_eval_for_the_probe(tmp_path):
    probe = LayerCKACallback(every_n_steps=2, probe_size=16, layers=["net.1", "net.2", "net.5"],
                             on_error="raise")  # fmt: skip
    trainer, _ = fit(tmp_path, [probe], max_steps=4, module=BNConvNet)
    steps, hist = probe.history
    assert steps == [2, 4] and np.isfinite(hist).all() and ((hist >= 0) & (hist <= 1)).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"centering": "none"}, ValueError, "`centering` can be 'samples' or 'full', got 'none'"),
        ({"estimator": "exact2"}, ValueError, "`estimator` can be 'exact' or 'hutchinson'"),
        ({"chunk_size": 0}, ValueError, "Expected `chunk_size` to be a positive int or None"),
        ({"num_probes": 1}, ValueError, "Expected `num_probes` to be an int >= 2, got 1"),
        ({"output_fn": 3}, TypeError, "Expected `output_fn` to be callable, got int"),
        ({"probe_size": 0}, ValueError, "Expected `probe_size` to be a positive int, got 0"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerCKACallback(**kwargs)


def test_unknown_layer_fails_at_setup_listing_layers(tmp_path):
    with pytest.raises(ValueError, match="Layer 'net.9' not found in TinyClassifier. Available"):
        fit(tmp_path, [LayerCKACallback(layers="net.9")], max_steps=1)


def _units(n: int, o: int):
    from lightning_probes.core.cost import CostUnits

    return CostUnits(
        forward_seconds=0.0, num_samples=n, num_outputs=o, flops_per_second=1e9,
        bytes_per_second=1e9, figure_seconds=0.0,
    )  # fmt: skip


def test_predicted_first_run_cost_grows_with_the_kernel_size():
    from conftest import TinyClassifier

    wide = TinyClassifier(d_in=64, hidden=256, classes=3)
    cka = LayerCKACallback(probe_size=64)
    cka._layer_names = ["net.0", "net.3", "net.5"]
    small = cka.predict_cost(wide, None, _units(64, 3))
    large = cka.predict_cost(wide, None, _units(128, 3))
    # layers wider than the kernel (P > n·o): the (n·o)² kernel terms dominate, ~4x for 2x n
    assert 3.5 < large / small <= 4.0
    no_rank = LayerCKACallback(probe_size=64, stable_rank=False)
    no_rank._layer_names = cka._layer_names
    assert no_rank.predict_cost(wide, None, _units(128, 3)) < large
    # narrow layers (P < n·o) are costed by their P x P Gram: at most linear in n
    narrow = TinyClassifier(d_in=8, hidden=16, classes=3)
    ratio = cka.predict_cost(narrow, None, _units(512, 3)) / cka.predict_cost(
        narrow, None, _units(256, 3)
    )
    assert 1.0 < ratio <= 2.0  # (plus the n-independent eigendecomposition)
    assert LayerCKACallback(estimator="hutchinson").predict_cost(wide, None, _units(8, 3)) is None
