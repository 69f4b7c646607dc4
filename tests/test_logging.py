import pytorch_lightning as pl
import torch
from conftest import TinyClassifier, make_loader, make_trainer
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback


class ArtefactProbe(ProbeCallback):
    probe_name = "art"
    default_schedule = {"every_n_steps": 2}

    def probe(self, trainer, pl_module, data):
        w = pl_module.net[0].weight
        plog.log_histogram(trainer, self.key("weights", "net.0"), w)
        plog.log_image(trainer, self.key("weights_image", "net.0"), w)
        plog.log_text(trainer, self.key("note"), "hello")
        if self.figures_enabled():
            fig = plog.new_figure()
            fig.add_subplot().plot([0, 1], [1, 0])
            plog.log_figure(trainer, self.key("figure"), fig)


def test_artefacts_reach_every_tensorboard_writer(tmp_path):
    pl.seed_everything(0, verbose=False)
    loggers = [
        TensorBoardLogger(str(tmp_path), name="a"),
        TensorBoardLogger(str(tmp_path), name="b"),
    ]
    trainer = make_trainer(tmp_path, [ArtefactProbe(probe_size=4)], max_steps=4, logger=loggers)
    trainer.fit(TinyClassifier(), make_loader())
    for logger in loggers:
        acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0})
        acc.Reload()
        tags = acc.Tags()
        assert [e.step for e in acc.Histograms("probes/art/net.0/weights")] == [2, 4]
        assert [e.step for e in acc.Images("probes/art/net.0/weights_image")] == [2, 4]
        assert [e.step for e in acc.Images("probes/art/figure")] == [2, 4]
        assert "probes/art/note/text_summary" in tags["tensors"]


def test_metric_key_and_unit_range_and_grid():
    assert plog.metric_key("lca", "total") == "probes/lca/total"
    assert plog.metric_key("lca", "total", "net.0") == "probes/lca/net.0/total"
    x = plog.to_unit_range(torch.tensor([2.0, 4.0, 3.0]))
    assert torch.equal(x, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(plog.to_unit_range(torch.ones(3)), torch.full((3,), 0.5))
    grid = plog.image_grid(torch.arange(5 * 2 * 2.0).reshape(5, 1, 2, 2), ncol=3, pad=1)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert grid[0, 1, 1] == 0.0 and grid[0, 2, 2] == 1.0  # each tile scaled on its own


class TwoScalars(ProbeCallback):
    probe_name = "two"
    default_schedule = {"every_n_steps": 2}

    def probe(self, trainer, pl_module, data):
        self.log_scalars(trainer, pl_module, {"probes/two/a": 1.0, "probes/two/b": 2.0})


def test_only_monitored_keys_go_through_lightning_module_log(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import EarlyStopping

    logged = []
    original = pl.LightningModule.log

    def spy(self, name, *args, **kwargs):
        logged.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", spy)
    stop = EarlyStopping(monitor="probes/two/a", patience=100, check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [TwoScalars(), stop], max_steps=4)
    trainer.fit(TinyClassifier(), make_loader())
    # the monitored key through pl_module.log (current per epoch, never stale); the other one
    # straight into callback_metrics (Lightning would re-process it at every later step)
    assert logged.count("probes/two/a") == 2 and "probes/two/b" not in logged
    assert float(trainer.callback_metrics["probes/two/b"]) == 2.0
    assert float(trainer.callback_metrics["probes/two/a"]) == 1.0
