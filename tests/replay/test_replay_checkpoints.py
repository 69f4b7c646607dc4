"""Replay refuses bad input with a message that says what was expected and how to fix it."""

from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl
import torch
from conftest import RecordingLogger, TinyClassifier, make_data, make_loader, make_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_probes import AblationAUCCallback, LossContributionCallback
from lightning_probes.replay import find_checkpoints, replay_checkpoints


class OtherModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Checkpoints of one 4-step run, at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    folder = tmp / "checkpoints"
    ckpt = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=2, save_last=True)
    trainer = make_trainer(tmp, [ckpt], max_steps=4, enable_checkpointing=True)
    trainer.fit(TinyClassifier(), make_loader())
    return folder


def data():
    return tuple(make_data(16, seed=1).tensors)


def replay(model, source, callbacks=None, **kw):
    kw.setdefault("probe_data", data())
    kw.setdefault("logger", RecordingLogger())
    return replay_checkpoints(model, source, callbacks or [AblationAUCCallback()], **kw)


def test_ordered_by_global_step_and_last_ckpt_deduplicated(run):
    found = find_checkpoints(run)
    assert [c.global_step for c in found] == [2, 4]
    assert "last.ckpt" in {p.name for p in run.iterdir()}  # same weights as step 4: one kept
    reversed_files = sorted(run.glob("epoch*.ckpt"), reverse=True)
    assert [c.global_step for c in find_checkpoints(reversed_files)] == [2, 4]


def test_empty_folder(tmp_path):
    with pytest.raises(
        ValueError, match=r"Expected checkpoints \(`\*.ckpt` files\) in .*found none"
    ):
        replay(TinyClassifier, tmp_path)
    with pytest.raises(ValueError, match="path.* that are not files"):
        replay(TinyClassifier, [tmp_path / "nope.ckpt"])


def test_checkpoint_of_another_model(run, tmp_path):
    with pytest.raises(
        ValueError, match=r"does not fit the model OtherModel: missing keys \['body"
    ):
        replay(OtherModel, run)
    wider = TinyClassifier(hidden=32)
    with pytest.raises(ValueError, match=r"shape mismatches \['net.0.weight: checkpoint \(16, 8\)"):
        replay(wider, run)
    with pytest.raises(ValueError, match="dtype mismatches.*model.double"):
        replay(TinyClassifier().double(), run)
    # a later checkpoint of another model: refused before anything is logged
    for path in run.glob("epoch*.ckpt"):
        shutil.copy(path, tmp_path / path.name)
    other = torch.load(run / "last.ckpt", weights_only=True)
    other["state_dict"], other["global_step"] = OtherModel().state_dict(), 6
    torch.save(other, tmp_path / "z.ckpt")
    logger = RecordingLogger()
    with pytest.raises(ValueError, match=r"'.*z.ckpt' does not fit the model TinyClassifier"):
        replay(TinyClassifier, tmp_path, logger=logger)
    assert logger.records == []


def test_folder_mixing_two_runs(run, tmp_path):
    for path in run.glob("epoch*.ckpt"):
        shutil.copy(path, tmp_path / path.name)
    other = torch.load(run / "last.ckpt", weights_only=True)
    other["state_dict"] = {k: v + 1 for k, v in other["state_dict"].items()}
    torch.save(other, tmp_path / "other-run.ckpt")
    with pytest.raises(ValueError, match="both at global step 4 but hold different weights"):
        replay(TinyClassifier, tmp_path)


def test_not_a_lightning_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="under 'state_dict'"):
        replay(TinyClassifier, tmp_path)
    torch.save({"state_dict": {}, "epoch": 0}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="int 'global_step'"):
        replay(TinyClassifier, tmp_path)
    torch.save({"state_dict": {}, "global_step": 1, "obj": OtherModel}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"with `torch.load\(weights_only=True\)`"):
        replay(TinyClassifier, tmp_path)


def test_arguments(run):
    with pytest.raises(ValueError, match="need.* a probe set: pass `probe_data=`"):
        replay(TinyClassifier, run, probe_data=None)
    with pytest.raises(TypeError, match="LightningModule instance or class"):
        replay(nn.Linear(8, 3), run)
    with pytest.raises(TypeError, match="non-empty list of probes"):
        replay(TinyClassifier, run, [pl.Callback()])
    used = AblationAUCCallback()
    replay(TinyClassifier, run, [used])
    with pytest.raises(ValueError, match=r"AblationAUCCallback \(2 runs\) that ran before"):
        replay(TinyClassifier, run, [used])
    one = sorted(run.glob("epoch*.ckpt"))[:1]
    with pytest.raises(ValueError, match="LossContributionCallback needs two checkpoints"):
        replay(TinyClassifier, one, [LossContributionCallback()])
