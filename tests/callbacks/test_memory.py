"""Out of memory anywhere in a probe's work: freed, retried smaller, or skipped; never fatal.

The OOMs below are real allocator errors (asking the CPU allocator for 1 PiB), raised from
user code the probes call (a loss, a model's forward), except the weight copy's, which is
injected through the public ``SharedWork.before_step``.
"""

from __future__ import annotations

import warnings

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
from torch import nn

from lightning_probes import LandscapeCallback, LossContributionCallback, NADCallback
from lightning_probes.callbacks.memory import (
    format_bytes,
    is_out_of_memory,
    needed_bytes,
    shrink_chunks,
)
from lightning_probes.callbacks.shared import SharedWork

PIB = 2**50


def allocate_a_pebibyte() -> None:
    torch.empty(PIB, dtype=torch.uint8)  # the CPU allocator refuses: a real OOM


def fit(tmp_path, callbacks, max_steps=4):
    pl.seed_everything(0, verbose=False)
    module = TinyClassifier(dropout=0.0)
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, make_loader(shuffle=False))
    return trainer, module, [str(w.message) for w in caught]


def test_the_allocators_reports_are_read():
    try:
        allocate_a_pebibyte()
    except RuntimeError as err:
        assert is_out_of_memory(err)
        assert needed_bytes(err) == PIB
    cuda = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.15 GiB"
    )
    assert is_out_of_memory(cuda) and needed_bytes(cuda) == int(2.5 * 2**30)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert needed_bytes(RuntimeError("out of memory")) is None
    assert format_bytes(PIB) == "1024.00 TiB" and format_bytes(512) == "512 B"


def test_chunks_halve_from_the_whole_probe_set_and_stop_at_one():
    probe = LandscapeCallback(chunk_size=None)
    assert shrink_chunks(probe, 20) == "chunk_size=10"
    assert [shrink_chunks(probe, 20) for _ in range(4)] == [
        "chunk_size=5",
        "chunk_size=2",
        "chunk_size=1",
        None,
    ]
    assert shrink_chunks(object(), 20) is None


def test_a_run_out_of_memory_is_retried_with_smaller_chunks_and_logs_the_right_loss(tmp_path):
    def loss_fn(outputs, targets):  # the memory a chunk needs grows with its samples
        if outputs.shape[0] > 8:
            allocate_a_pebibyte()
        return nn.functional.cross_entropy(outputs, targets)

    probe = LandscapeCallback(every_n_steps=2, plane_every_n_runs=0, probe_size=32, loss_fn=loss_fn)
    trainer, module, messages = fit(tmp_path, [probe], max_steps=2)
    assert probe.chunk_size == 8 and probe.runs == 1
    retried = [m for m in messages if "retried with `chunk_size=8`" in m]
    assert len(retried) == 1 and "an allocation of 1024.00 TiB" in retried[0]
    logger = trainer.logger
    assert isinstance(logger, RecordingLogger)
    data = probe.probe_set
    assert data is not None
    with torch.no_grad():  # float64 reference on the weights after step 2
        ref = module.double()(data.inputs.double())
        want = nn.functional.cross_entropy(ref, data.targets).item()
    assert logger.values_of("probes/landscape/loss") == [pytest.approx(want, rel=1e-5)]


class HungryNet(nn.Module):
    """The architecture the NAD basis is computed on; its forward asks for 1 PiB."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        allocate_a_pebibyte()
        return self.fc(x)


def test_out_of_memory_at_fit_start_turns_the_probe_off_and_training_is_unchanged(tmp_path):
    trainer_a, module_a, _ = fit(tmp_path / "a", [])
    nad = NADCallback(HungryNet, num_networks=4, every_n_steps=2, probe_size=16)
    trainer_b, module_b, messages = fit(tmp_path / "b", [nad])
    off = [m for m in messages if "ran out of memory in its fit-start work" in m]
    assert len(off) == 1 and "is off for this fit" in off[0] and "1024.00 TiB" in off[0]
    assert nad.runs == 0 and trainer_b.global_step == 4
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_out_of_memory_at_fit_start_raises_with_on_error_raise(tmp_path):
    nad = NADCallback(HungryNet, num_networks=4, every_n_steps=2, probe_size=16, on_error="raise")
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        fit(tmp_path, [nad])


def test_out_of_memory_copying_the_weights_skips_that_step_only(tmp_path, monkeypatch):
    copy = SharedWork.before_step

    def before_step(self, model, step):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return copy(self, model, step)

    monkeypatch.setattr(SharedWork, "before_step", before_step)
    trainer_a, module_a, _ = fit(tmp_path / "a", [], max_steps=5)
    lca = LossContributionCallback(every_n_steps=1, probe_size=32)
    trainer_b, module_b, messages = fit(tmp_path / "b", [lca], max_steps=5)
    warned = [m for m in messages if "copying the weights before step 3" in m]
    assert len(warned) == 1 and "an allocation of 2.00 GiB" in warned[0]
    logger = trainer_b.logger
    assert isinstance(logger, RecordingLogger)
    assert logger.steps_of("probes/lca/lc") == [1, 2, 4, 5]
    a = parameters_and_optimizer_state(trainer_a, module_a)
    b = parameters_and_optimizer_state(trainer_b, module_b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lca_keeps_its_weight_copy_for_the_retry_and_gives_the_same_allocation(tmp_path):
    def hungry_loss(outputs, targets):
        if outputs.shape[0] > 8:
            allocate_a_pebibyte()
        return nn.functional.cross_entropy(outputs, targets)

    plain = LossContributionCallback(every_n_steps=1, probe_size=32, chunk_size=8)
    trainer_a, _, _ = fit(tmp_path / "a", [plain])
    retried = LossContributionCallback(every_n_steps=1, probe_size=32, loss_fn=hungry_loss)
    trainer_b, _, messages = fit(tmp_path / "b", [retried])
    assert retried.chunk_size == 8 and retried.runs == 4
    assert len([m for m in messages if "retried with `chunk_size=8`" in m]) == 1
    a, b = trainer_a.logger, trainer_b.logger
    assert isinstance(a, RecordingLogger) and isinstance(b, RecordingLogger)
    assert b.steps_of("probes/lca/lc") == [1, 2, 3, 4]
    assert b.values_of("probes/lca/lc") == pytest.approx(a.values_of("probes/lca/lc"), rel=1e-6)


def test_a_run_that_never_fits_is_skipped_and_its_setting_restored():
    from lightning_probes.callbacks.memory import (
        MAX_RETRIES,
        ProbeOutOfMemoryError,
        run_retrying,
    )

    probe, attempts, warned = LandscapeCallback(chunk_size=64), [], []

    def run():
        attempts.append(probe.chunk_size)
        allocate_a_pebibyte()

    with pytest.raises(ProbeOutOfMemoryError, match=r"1024.00 TiB.*even with `chunk_size=1`"):
        run_retrying(run, probe, 256, None, lambda tag, msg: warned.append(msg))
    assert attempts == [64, 32, 16, 8, 4, 2, 1][: MAX_RETRIES + 1]
    assert probe.chunk_size == 64 and warned == []
