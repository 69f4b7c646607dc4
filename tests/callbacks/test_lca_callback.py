"""LossContributionCallback with a real Trainer: values vs a naive reference, hooks, state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    TinyClassifier,
    make_data,
    make_loader,
    make_trainer,
    parameters_and_optimizer_state,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader

from lightning_probes import LossContributionCallback

KEY = "probes/lca/"


class SmoothClassifier(TinyClassifier):
    """Tanh MLP (a smooth loss along each step) with dropout (off inside the probe)."""

    def __init__(self, dropout=0.2, lr=0.2, momentum=0.9):
        super().__init__(dropout=dropout)
        self.net[1] = nn.Tanh()
        self.net[4] = nn.Tanh()
        self.lr, self.momentum = lr, momentum

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class Recorder(pl.Callback):
    """θ_t at batch start and θ_{t+1} at the end of every batch that stepped (by step)."""

    def __init__(self):
        self.before, self.after, self.buffers, self._start, self._seen = {}, {}, {}, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, idx):
        if self._start is None:
            self._start = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, idx):
        if trainer.global_step != self._seen:
            self._seen = trainer.global_step
            self.before[self._seen] = self._start
            self.after[self._seen] = {
                k: v.detach().clone() for k, v in pl_module.named_parameters()
            }
            self.buffers[self._seen] = {k: v.clone() for k, v in pl_module.named_buffers()}
            self._start = None


def reference_lc(module, before, after, x, y, nodes=16):
    """Per-parameter LC by Gauss-Legendre quadrature with torch.func.grad, on a model copy."""
    model = copy.deepcopy(module).eval()
    x = x.to(next(model.parameters()).dtype)

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    s, w = np.polynomial.legendre.leggauss(nodes)
    lc = {k: torch.zeros_like(v) for k, v in before.items()}
    for si, wi in zip((s + 1) / 2, w / 2):
        g = grad(loss)({k: before[k] + float(si) * (after[k] - before[k]) for k in before})
        for k in lc:
            lc[k] += float(wi) * g[k] * (after[k] - before[k])
    return lc, float(loss(after) - loss(before))


def fit(tmp_path, callbacks, module=TinyClassifier, max_steps=8, loader=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = module()
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, **kwargs)
    trainer.fit(module, loader or make_loader())
    return trainer, module


def layer_of(name):
    return name.rpartition(".")[0]


def test_logged_values_match_a_naive_reference(tmp_path):
    lca = LossContributionCallback(
        every_n_steps=3, window=2, probe_size=48, tolerance=1e-7, chunk_size=20
    )
    rec = Recorder()
    trainer, module = fit(
        tmp_path, [rec, lca], module=SmoothClassifier, precision="64-true", gradient_clip_val=0.5
    )
    log = trainer.logger
    assert log.steps_of(KEY + "lc") == [1, 3, 4, 6, 7]  # windows {0, 1}, {3, 4}, {6, 7}
    x, y = lca.probe_set.inputs, lca.probe_set.targets
    assert x.dtype == torch.float64  # cast to the model's dtype under "64-true"
    layers = ["net.0", "net.3", "net.5"]
    cumulative = dict.fromkeys(layers, 0.0)
    for i, step in enumerate([1, 3, 4, 6, 7]):
        ref, true = reference_lc(module, rec.before[step], rec.after[step], x, y)
        assert log.values_of(KEY + "true_delta_loss")[i] == pytest.approx(true, rel=1e-9)
        assert log.values_of(KEY + "lc")[i] == pytest.approx(true, abs=1e-7)  # the tolerance
        assert log.values_of(KEY + "error")[i] <= 1e-7
        helped = sum(int((v < 0).sum()) for v in ref.values()) / sum(
            v.numel() for v in ref.values()
        )
        assert log.values_of(KEY + "fraction_helped")[i] == pytest.approx(helped, abs=0.01)
        for layer in layers:
            own = [v for k, v in ref.items() if layer_of(k) == layer]
            expected = sum(float(v.sum()) for v in own)
            cumulative[layer] += expected
            assert log.values_of(KEY + f"{layer}/lc")[i] == pytest.approx(expected, rel=1e-4)
            assert log.values_of(KEY + f"{layer}/cumulative_lc")[i] == pytest.approx(
                cumulative[layer], rel=1e-4
            )
            helped = sum(int((v < 0).sum()) for v in own) / sum(v.numel() for v in own)
            assert log.values_of(KEY + f"{layer}/fraction_helped")[i] == pytest.approx(
                helped, abs=0.02
            )
    # per-layer sums are the sums of the per-parameter cumulative state
    for layer in layers:
        own = [v for k, v in lca.cumulative_lc.items() if layer_of(k) == layer]
        assert sum(float(v.sum()) for v in own) == pytest.approx(cumulative[layer], rel=1e-4)
    assert log.values_of(KEY + "net.0/cumulative_lc")[-1] == pytest.approx(
        sum(float(v.sum()) for k, v in lca.cumulative_lc.items() if layer_of(k) == "net.0"),
        rel=1e-12,
    )
    # gradient reuse: steps 4 and 7 start from the gradient kept at the end of steps 3 and 6
    splits = lca.history[:, 5]
    assert lca.grad_evals == int((splits + 1).sum()) - 2


def test_simpson_steady_state_uses_two_gradient_evaluations_per_step(tmp_path):
    lca = LossContributionCallback(method="simpson", every_n_steps=1, probe_size=32)
    fit(tmp_path, [lca], max_steps=6)
    assert lca.grad_evals == 3 + 2 * 5
    assert lca.history[:, 5].tolist() == [2.0] * 6
    first = LossContributionCallback(method="first_order", every_n_steps=1, probe_size=32)
    fit(tmp_path / "fo", [first], max_steps=6)
    assert first.grad_evals == 2 + 1 * 5  # steady state: the gradient at θ_{t+1} only


def test_observer_bit_identical_weights_with_batchnorm_and_dropout(tmp_path):
    class BNNet(TinyClassifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
            )

    trainer_a, module_a = fit(tmp_path / "a", [], module=BNNet, max_steps=6)
    lca = LossContributionCallback(every_n_steps=3, window=2, probe_size=24, chunk_size=10)
    trainer_b, module_b = fit(tmp_path / "b", [lca], module=BNNet, max_steps=6)
    assert lca.history[:, 0].tolist() == [1.0, 3.0, 4.0, 6.0]
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert any("running_mean" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert lca._before is None and lca._cache is None  # released at the end of fitting


def test_batchnorm_batch_vs_running_statistics(tmp_path):
    class BNNet(SmoothClassifier):
        def __init__(self):
            super().__init__(dropout=0.0)
            self.net = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)
            )

    results = {}
    for mode in ("batch", "running"):
        lca = LossContributionCallback(every_n_steps=1, probe_size=64, batchnorm=mode)
        rec = Recorder()
        _, module = fit(tmp_path / mode, [rec, lca], module=BNNet, max_steps=2, precision="64-true")
        results[mode] = lca.history
        # reference: the BatchNorm module in the mode the authors use (batch) or eval
        model = copy.deepcopy(module).eval()
        if mode == "batch":
            model.net[1].train()
        x, y = lca.probe_set.inputs, lca.probe_set.targets
        for i, step in enumerate([1, 2]):
            with torch.no_grad():
                losses = []
                for params in (rec.before[step], rec.after[step]):
                    out = functional_call(model, {**params, **rec.buffers[step]}, (x,))
                    losses.append(float(nn.functional.cross_entropy(out, y)))
            assert float(lca.history[i, 2] - lca.history[i, 1]) == pytest.approx(
                losses[1] - losses[0], rel=1e-9
            )
    assert not torch.allclose(results["batch"][:, 1], results["running"][:, 1])


def test_gradient_accumulation_of_two_equals_the_single_step(tmp_path):
    class Plain(SmoothClassifier):
        def __init__(self):
            super().__init__(dropout=0.0, momentum=0.0)

    single = LossContributionCallback(every_n_steps=1, probe_size=32, method="simpson")
    fit(
        tmp_path / "a", [single], module=Plain, max_steps=4, precision="64-true",
        loader=make_loader(batch_size=16, shuffle=False),
    )  # fmt: skip
    accumulated = LossContributionCallback(every_n_steps=1, probe_size=32, method="simpson")
    fit(
        tmp_path / "b", [accumulated], module=Plain, max_steps=4, precision="64-true",
        loader=make_loader(batch_size=8, shuffle=False), accumulate_grad_batches=2,
    )  # fmt: skip
    assert accumulated.history[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
    torch.testing.assert_close(accumulated.history, single.history, rtol=1e-9, atol=1e-12)
    for k, v in single.cumulative_lc.items():
        torch.testing.assert_close(accumulated.cumulative_lc[k], v, rtol=1e-8, atol=1e-13)


def test_frozen_layer_gets_zero_lc(tmp_path):
    class Frozen(SmoothClassifier):
        def __init__(self):
            super().__init__()
            self.net[0].requires_grad_(False)

    lca = LossContributionCallback(every_n_steps=1, probe_size=32)
    trainer, _ = fit(tmp_path, [lca], module=Frozen, max_steps=3)
    log = trainer.logger
    assert log.values_of(KEY + "net.0/lc") == [0.0, 0.0, 0.0]
    assert log.values_of(KEY + "net.0/cumulative_lc") == [0.0, 0.0, 0.0]
    assert log.steps_of(KEY + "net.0/fraction_helped") == []
    assert all(v != 0.0 for v in log.values_of(KEY + "net.3/lc"))
    assert not lca.cumulative_lc["net.0.weight"].any()
    assert lca.cumulative_lc["net.3.weight"].any()


class SkippingSGD(torch.optim.SGD):
    """Like a GradScaler that found inf: the closure runs, every 2nd update is skipped."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        if self.calls % 2 == 0:
            with torch.enable_grad():
                closure()
            return None
        return super().step(closure)


def test_steps_skipped_by_the_scaler_allocate_nothing(tmp_path):
    class Skipping(SmoothClassifier):
        def configure_optimizers(self):
            return SkippingSGD(self.parameters(), lr=0.2)

    lca = LossContributionCallback(every_n_steps=1, probe_size=32, method="simpson")
    rec = Recorder()
    trainer, module = fit(tmp_path, [rec, lca], module=Skipping, max_steps=6)
    assert lca.skipped_steps == 3
    assert trainer.logger.steps_of(KEY + "lc") == [1, 3, 5]
    for i, step in enumerate([1, 3, 5]):
        assert float(lca.history[i, 0]) == step
        _, true = reference_lc(module, rec.before[step], rec.after[step], *_probe(lca))
        assert float(lca.history[i, 2] - lca.history[i, 1]) == pytest.approx(true, abs=1e-6)
    # the gradient at the unchanged θ is reused through the skipped steps: 3 + 2 + 2
    assert lca.grad_evals == 7


def _probe(lca):
    return lca.probe_set.inputs, lca.probe_set.targets


def test_several_optimizers_in_manual_optimization(tmp_path):
    class TwoOptimizers(SmoothClassifier):
        def __init__(self):
            super().__init__(dropout=0.0)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt_a, opt_b = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            opt_a.zero_grad()
            opt_b.zero_grad()
            self.manual_backward(loss)
            opt_a.step()
            opt_b.step()

        def configure_optimizers(self):
            first = list(self.net[0].parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in first)]
            return torch.optim.SGD(first, lr=0.3), torch.optim.Adam(rest, lr=0.01)

    lca = LossContributionCallback(every_n_steps=1, probe_size=32, tolerance=1e-9)
    rec = Recorder()
    trainer, module = fit(
        tmp_path, [rec, lca], module=TwoOptimizers, max_steps=6, precision="64-true"
    )
    steps = trainer.logger.steps_of(KEY + "lc")
    assert steps == [2, 4, 6]  # global_step counts each optimizer's step
    for i, step in enumerate(steps):
        ref, true = reference_lc(module, rec.before[step], rec.after[step], *_probe(lca))
        assert trainer.logger.values_of(KEY + "true_delta_loss")[i] == pytest.approx(true)
        for layer in ("net.0", "net.5"):  # one layer of each optimizer
            expected = sum(float(v.sum()) for k, v in ref.items() if layer_of(k) == layer)
            assert expected != 0.0
            got = trainer.logger.values_of(KEY + f"{layer}/lc")[i]
            assert got == pytest.approx(expected, abs=1e-9)


def test_resume_interrupted_equals_uninterrupted(tmp_path):
    class Deterministic(SmoothClassifier):
        def __init__(self):
            super().__init__(dropout=0.0)  # RNG is not checkpointed: no dropout

    def loader():
        return make_loader(batch_size=16, shuffle=False)  # 4 steps per epoch

    full = LossContributionCallback(every_n_steps=1, window=1, probe_size=32, method="simpson")
    fit(
        tmp_path / "full", [full], module=Deterministic, max_steps=-1, max_epochs=2, loader=loader()
    )

    first = LossContributionCallback(every_n_steps=1, window=1, probe_size=32, method="simpson")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_epochs=1)
    fit(
        tmp_path / "first", [first, ckpt], module=Deterministic, max_steps=-1, max_epochs=1,
        loader=loader(), enable_checkpointing=True,
    )  # fmt: skip
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert raw["callbacks"][first.state_key]["history"].shape == (4, 7)
    resumed = LossContributionCallback(every_n_steps=1, window=1, probe_size=32, method="simpson")
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path / "resumed", [resumed], max_steps=-1, max_epochs=2)
    trainer.fit(Deterministic(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.logger.steps_of(KEY + "lc") == [5, 6, 7, 8]
    torch.testing.assert_close(resumed.history, full.history, rtol=0, atol=0)
    for k, v in full.cumulative_lc.items():
        assert torch.equal(resumed.cumulative_lc[k], v), k


def test_tensorboard_artefacts_weibull_and_neurons(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    lca = LossContributionCallback(
        every_n_steps=4, window=2, probe_size=32, per_neuron=True, method="simpson"
    )
    fit(tmp_path, [lca], max_steps=6, logger=logger, loader=DataLoader(make_data(128), 16))
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars(KEY + "lc")] == [1, 4, 5]
    assert [e.step for e in acc.Histograms(KEY + "net.0/lc")] == [1, 5]  # window ends
    assert [e.step for e in acc.Images(KEY + "cumulative_by_layer")] == [1, 5]
    assert [e.step for e in acc.Images(KEY + "loss_curve")] == [1, 5]
    shape = acc.Scalars(KEY + "weibull_shape")
    assert [e.step for e in shape] == [1, 5] and all(0.1 < e.value < 3 for e in shape)
    # per-neuron: row sums of the cumulative weight LC plus the bias, fraction of neurons < 0
    neurons = lca.cumulative_lc["net.0.weight"].sum(1) + lca.cumulative_lc["net.0.bias"]
    last = acc.Scalars(KEY + "net.0/neuron_fraction_helped")[-1].value
    assert last == pytest.approx(float((neurons < 0).float().mean()), abs=1e-6)
    assert acc.Histograms(KEY + "net.3/neuron_cumulative_lc")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "euler"}, "`method` can be 'first_order', 'simpson', 'adaptive', got 'euler'"),
        ({"window": 0}, "Expected `window` to be a positive int, got 0"),
        ({"batchnorm": "train"}, "`batchnorm` can be 'batch' or 'running', got 'train'"),
        ({"every_n_epochs": 1}, "Expected a step schedule .* got every_n_epochs=1"),
        ({"splits": 5}, "Expected `splits` to be an even int >= 2, got 5"),
        ({"tolerance": -1.0}, "Expected `tolerance` to be a positive number, got -1.0"),
        ({"chunk_size": 0}, "Expected `chunk_size` to be a positive int or None, got 0"),
        ({"artefact_every_n_steps": 0}, "Expected `artefact_every_n_steps` to be a positive"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossContributionCallback(**kwargs)
