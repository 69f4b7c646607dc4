"""LayerCKACallback's default layers on real models (issue 14, item 5): before, fit stopped at
start ("exactly once per forward, got 0 calls" for MultiheadAttention.out_proj)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from reference import reference_kernels

from lightning_probes import LayerCKACallback
from lightning_probes.functional.alignment import kernel_label_alignment

pytest.importorskip("transformers")

from real_models import SEQ, SeqEncoder, seq_loader

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def test_sequence_first_encoder_defaults_log_the_reference_alignment(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = SeqEncoder(batch_first=False)
    cb = LayerCKACallback(probe_size=SEQ, every_n_steps=2, log_figures=False, stable_rank=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    trainer.fit(model, seq_loader(32))
    # the attention blocks are layers of their own (all their parameters, out_proj's included)
    blocks = [
        f"encoder.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn", "linear1", "linear2")
    ]
    assert cb._layer_names == [*blocks, "head"]
    steps, hist = cb.history
    assert steps == [2]
    data = cb.probe_set  # T == n == 12: the sequence axis has the sample axis' size
    net = model.double().eval()
    kernels = reference_kernels(net, data.inputs, cb._layer_names, recurse=True)
    want = [float(kernel_label_alignment(kernels[k], data.targets, 3)) for k in cb._layer_names]
    torch.testing.assert_close(
        torch.as_tensor(hist[0]), torch.tensor(want).double(), rtol=1e-4, atol=1e-6
    )


def test_hutchinson_estimator_refused_at_fit_start_where_forward_ad_is_missing(tmp_path):
    """PyTorch's fused encoder layer has no forward-mode AD: the Hutchinson estimator used to
    fail at every run; it now stops fit before the first step, naming the exact estimator."""
    from conftest import make_trainer
    from real_models import SeqEncoder, seq_loader

    import lightning_probes as lp

    cb = lp.LayerCKACallback(every_n_steps=1, probe_size=8, estimator="hutchinson")
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    with pytest.raises(ValueError, match="forward-mode AD.*estimator='exact'"):
        trainer.fit(SeqEncoder(batch_first=True), seq_loader(32))
    assert trainer.global_step == 0
