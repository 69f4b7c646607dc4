"""Probes on models from real packages (HF transformers from tiny configs), against references
computed by hand: each test fails on the behaviour reported in issue 14."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.data import draw_probe_set
from lightning_probes.core.evaluation import probe_loss

pytest.importorskip("transformers")

from real_models import GPT2LM, BertClassifier, dict_loader, token_data


def test_bert_probe_loss_uses_the_attention_mask():
    """A dict batch keeps `attention_mask`: the probe-set loss equals a per-sample loop that
    passes the mask by hand (and differs from the loss without it)."""
    torch.manual_seed(0)
    model = BertClassifier().double().eval()
    data = draw_probe_set(dict_loader(token_data(24, classes=3)), 16, seed=1)
    assert set(data.inputs) == {"input_ids", "attention_mask"}
    got = probe_loss(model, data, chunk_size=5)
    ids, mask, y = data.inputs["input_ids"], data.inputs["attention_mask"], data.targets
    with torch.no_grad():
        per = [
            nn.functional.cross_entropy(model(ids[i : i + 1], mask[i : i + 1]), y[i : i + 1])
            for i in range(len(y))
        ]
        unmasked = nn.functional.cross_entropy(model(ids, torch.ones_like(mask)), y)
    want = torch.stack(per).mean()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (mask == 0).any() and not torch.isclose(want, unmasked)


def test_gpt2_probe_loss_is_token_level_cross_entropy():
    torch.manual_seed(0)
    model = GPT2LM().double().eval()
    data = draw_probe_set(dict_loader(token_data(20)), 12, seed=1)
    got = probe_loss(model, data, chunk_size=12)
    ids, labels = data.inputs, data.targets
    with torch.no_grad():
        logits = model(ids)
        total = sum(
            -torch.log_softmax(logits[i, t], 0)[labels[i, t]]
            for i in range(ids.shape[0])
            for t in range(ids.shape[1])
        )
    torch.testing.assert_close(got, total / labels.numel(), rtol=1e-10, atol=1e-12)
