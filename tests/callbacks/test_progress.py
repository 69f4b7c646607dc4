"""A running probe is named inside Lightning's progress bar, and the bar is left as it was."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from conftest import RecordingLogger, TinyClassifier, make_loader
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.progress import shown_in_progress_bar


class SeesTheBar(ProbeCallback):
    probe_name = "sees"
    default_schedule = {"every_n_steps": 2}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[str] = []

    def probe(self, trainer, pl_module, data):
        self.seen.append(status(trainer))


def status(trainer) -> str:
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):
        return next(t.description for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    return bar.train_progress_bar.postfix or ""


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_the_training_bar_names_the_running_probe_and_is_restored(tmp_path, bar):
    if bar is RichProgressBar:
        pytest.importorskip("rich")
    probe = SeesTheBar(probe_size=8)
    trainer = pl.Trainer(
        default_root_dir=str(tmp_path), max_steps=4, accelerator="cpu", logger=RecordingLogger(),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
        callbacks=[probe, bar()],
    )  # fmt: skip
    trainer.fit(TinyClassifier(), make_loader())
    assert len(probe.seen) == 2 and all(s.endswith("SeesTheBar: running") for s in probe.seen)
    assert "SeesTheBar" not in status(trainer)


def test_without_a_bar_nothing_is_shown():
    class NoBar:
        progress_bar_callback = None

    with shown_in_progress_bar(NoBar(), "X") as update:
        update("1/2")  # no bar: a no-op
