"""Ablation and selectivity on dict/tuple inputs (BERT with its attention mask) against the
model called by hand with the mask, on every path: chunks, expanded batches, statistics
(issue 14, item 3)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_probes.core.interventions.ablation import ablation_curve, noise_curve
from lightning_probes.core.interventions.selectivity import (
    class_selectivity,
    unit_ablation_impact,
)

pytest.importorskip("transformers")

from real_models import BertClassifier, token_data

LAYER = "model.bert.encoder.layer.0.intermediate.dense"


def bert(relu: bool = False) -> BertClassifier:
    torch.manual_seed(0)
    model = BertClassifier().double().eval()
    if relu:
        model.model.bert.encoder.layer[0].intermediate.intermediate_act_fn = nn.ReLU()
    return model


def probe(n: int = 14, seed: int = 2):
    data = token_data(n, seed=seed, classes=3)
    return data["input_ids"], data["attention_mask"], data["labels"]


def act_of(model):
    return model.model.bert.encoder.layer[0].intermediate.intermediate_act_fn


def with_units(model, keep, fill, call):
    """``call()`` with the point's units (last axis) not in ``keep`` set to ``fill``."""

    def hook(mod, args, out):
        return torch.where(keep, out, fill.expand_as(out) if torch.is_tensor(fill) else fill)

    handle = act_of(model).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return call()
    finally:
        handle.remove()


@pytest.mark.parametrize("budget", [2**25, 2**17])  # all at once; 1 sample x 5 masks per pass
def test_bert_ablation_curve_with_dict_and_tuple_inputs_uses_the_mask(budget):
    model = bert()
    ids, mask, y = probe()
    kw = {"layers": LAYER, "num_orderings": 2, "fractions": torch.linspace(0, 1, 5)}
    with warnings.catch_warnings():  # the residual's per-sample arguments are repeated:
        warnings.filterwarnings("error", message=".*mixes activations")  # no block fallback
        curve = ablation_curve(model, {"input_ids": ids, "attention_mask": mask}, y,
                               generator=torch.Generator().manual_seed(0), memory_budget=budget,
                               **kw)  # fmt: skip
        again = ablation_curve(model, (ids, mask), y, generator=torch.Generator().manual_seed(0),
                               memory_budget=budget, **kw)  # fmt: skip
    assert torch.equal(curve.accuracy, again.accuracy)
    assert curve.num_units == {LAYER: 64}
    for r, order in enumerate(curve.orderings):
        for k, count in enumerate(curve.counts.tolist()):
            keep = torch.ones(64, dtype=torch.bool)
            keep[order[:count]] = False
            logits = with_units(model, keep, 0.0, lambda: model(ids, mask))
            want = float((logits.argmax(1) == y).double().mean())
            assert float(curve.accuracy[r, k]) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("value", ["zero", "mean"])
def test_bert_unit_ablation_impact_is_the_masked_loss_change(value):
    model = bert()
    ids, mask, y = probe()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixes activations")
        impact = unit_ablation_impact(model, inputs, y, layers=LAYER, value=value)[LAYER]
    rec = []
    handle = act_of(model).register_forward_hook(lambda m, a, o: rec.append(o.clone()))
    with torch.no_grad():
        model(ids, mask)
    handle.remove()
    fill = rec[0].mean(0) if value == "mean" else 0.0  # each element's mean on the probe set

    def loss(keep, m):
        logits = with_units(model, keep, fill, lambda: model(ids, m))
        return nn.functional.cross_entropy(logits, y)

    full = torch.ones(64, dtype=torch.bool)
    unmasked = torch.ones_like(mask)
    differs = False
    for j in (0, 9, 63):
        keep = full.clone()
        keep[j] = False
        want = loss(keep, mask) - loss(full, mask)
        torch.testing.assert_close(impact[j], want, rtol=1e-8, atol=1e-12)
        differs |= not torch.isclose(impact[j], loss(keep, unmasked) - loss(full, unmasked))
    assert (mask == 0).any() and differs


def test_bert_selectivity_with_dict_inputs_uses_the_mask():
    model = bert(relu=True)
    ids, mask, y = probe(18)
    si = class_selectivity(model, {"input_ids": ids, "attention_mask": mask}, y, layers=LAYER,
                           num_classes=3)[LAYER]  # fmt: skip

    def reference(m):
        rec = []
        handle = act_of(model).register_forward_hook(lambda mod, a, o: rec.append(o.clone()))
        with torch.no_grad():
            model(ids, m)
        handle.remove()
        act = rec[0].mean(1)  # [n, 64]: averaged over positions
        means = torch.stack([act[y == c].mean(0) for c in range(3)])
        top = means.max(0).values
        rest = (means.sum(0) - top) / 2
        return torch.where(top + rest > 0, (top - rest) / (top + rest), torch.zeros_like(top))

    torch.testing.assert_close(si, reference(mask), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(si, reference(torch.ones_like(mask)), rtol=1e-6, atol=1e-9)


def test_noise_curve_runs_on_dict_inputs():
    model = bert()
    ids, mask, y = probe(8)
    with pytest.warns(UserWarning, match="mixes activations"):
        noise = noise_curve(model, {"input_ids": ids, "attention_mask": mask}, y, layers=LAYER,
                            scales=torch.tensor([0.0, 1.0]), num_repeats=2)  # fmt: skip
    clean = float((model(ids, mask).argmax(1) == y).double().mean())
    assert noise.accuracy[:, 0].tolist() == [pytest.approx(clean)] * 2
