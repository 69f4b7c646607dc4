"""Default ablation/selectivity layers on transformers and ResNets: modules that run, hidden
(post-nonlinearity) linear-family layers, batch-first points; sequence-first points refused
(issue 14, item 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.hooks import count_calls
from lightning_probes.core.interventions.ablation import ablation_curve, ablation_points

pytest.importorskip("transformers")

from real_models import GPT2LM, BertClassifier, ResNet18, SeqEncoder, token_data


def defaults(model, inputs):
    return {k: p.name for k, p in ablation_points(model, inputs, None).items()}


def test_gpt2_and_bert_defaults_are_the_mlp_first_layers_after_their_activation():
    torch.manual_seed(0)
    gpt2, bert = GPT2LM().eval(), BertClassifier().eval()
    data = token_data(4, classes=3)
    h = "model.transformer.h"
    assert defaults(gpt2, data["input_ids"]) == {
        f"{h}.{i}.mlp.c_fc": f"{h}.{i}.mlp.act" for i in range(2)
    }
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    e = "model.bert.encoder.layer"
    assert defaults(bert, inputs) == {
        f"{e}.0.intermediate.dense": f"{e}.0.intermediate.intermediate_act_fn",
        f"{e}.1.intermediate.dense": f"{e}.1.intermediate.intermediate_act_fn",
        "model.bert.pooler.dense": "model.bert.pooler.activation",
    }
    for model, x in ((gpt2, data["input_ids"]),):  # every default runs once per forward
        named = dict(model.named_modules())
        assert set(count_calls(model, {k: named[k] for k in defaults(model, x)}, x).values()) == {1}


def test_seq_encoder_defaults_batch_first_and_refusal_sequence_first():
    torch.manual_seed(0)
    data = token_data(6, classes=3)
    ids, y = data["input_ids"], data["labels"]
    first = SeqEncoder(batch_first=True).double().eval()
    layers = defaults(first, ids)
    assert layers == {f"encoder.layers.{i}.linear1": f"encoder.layers.{i}.linear1" for i in (0, 1)}
    assert not any("self_attn" in k for k in layers)  # never MHA internals
    curve = ablation_curve(first, ids, y, layers=None, num_orderings=2,
                           fractions=torch.linspace(0, 1, 4))  # fmt: skip
    assert curve.num_units == dict.fromkeys(layers, 32)  # features, not positions
    lin = first.encoder.layers[0].linear1, first.encoder.layers[1].linear1
    for r, order in enumerate(curve.orderings):
        for k, count in enumerate(curve.counts.tolist()):
            keep = torch.ones(64, dtype=torch.bool)
            keep[order[:count]] = False
            handles = [
                m.register_forward_hook(lambda mod, a, o, kk=kk: o * kk.to(o.dtype))
                for m, kk in zip(lin, keep.split(32))
            ]
            with torch.no_grad():
                want = float((first(ids).argmax(1) == y).double().mean())
            for handle in handles:
                handle.remove()
            assert float(curve.accuracy[r, k]) == pytest.approx(want, abs=1e-12)

    seq = SeqEncoder(batch_first=False).double().eval()
    with pytest.raises(ValueError, match=r"'encoder.layers.0.linear1' \(sample axis 1\)"):
        ablation_points(seq, ids, None)
    short = ids[:, :3]  # T == 3 == the samples the axis check permutes
    with pytest.raises(ValueError, match="'encoder.layers.0.linear1'.*got axis 1"):
        ablation_curve(seq, short, y, layers="encoder.layers.0.linear1")


def test_defaults_skip_modules_that_do_not_run_and_resnets_take_the_last_three_convs():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.spare, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    assert defaults(Spare(), torch.randn(4, 4)) == {"fc1": "act"}
    torch.manual_seed(0)
    resnet = ResNet18(width=4).eval()
    assert list(defaults(resnet, torch.randn(3, 3, 32, 32))) == [
        "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2",
    ]  # fmt: skip
