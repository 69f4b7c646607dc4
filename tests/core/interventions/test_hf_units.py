"""Units of HF ``Conv1D`` (GPT-2), token accuracy, and selectivity on signed activity (issue 14,
items 1-2), against forward hooks and loops written here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.interventions.ablation import ablation_curve, ablation_points
from lightning_probes.core.interventions.selectivity import (
    class_selectivity,
    unit_ablation_impact,
    unit_activity,
)
from lightning_probes.functional.selectivity import selectivity_index

pytest.importorskip("transformers")

from real_models import GPT2LM, ResNet18, token_data


def gpt2(relu: bool = False) -> GPT2LM:
    torch.manual_seed(0)
    model = GPT2LM().double().eval()
    if relu:  # a non-negative activation, so that selectivity is defined
        for block in model.model.transformer.h:
            block.mlp.act = nn.ReLU()
    return model


def hooked(model, modules, keep, call):
    """``call()`` with each module's output multiplied by ``keep[name]`` on the last axis."""
    handles = [
        m.register_forward_hook(lambda mod, a, out, k=keep[n]: out * k.to(out.dtype))
        for n, m in modules.items()
    ]
    try:
        with torch.no_grad():
            return call()
    finally:
        for h in handles:
            h.remove()


def token_accuracy(logits, labels):
    valid = labels != -100
    return float(((logits.argmax(-1) == labels) & valid).sum()) / float(valid.sum())


def test_gpt2_default_ablation_curve_ablates_features_at_every_position():
    """Default layers are each block's ``mlp.c_fc`` (HF Conv1D), read after its GELU; units
    are the 4 * n_embd features (not the 12 positions); accuracy is per token (-100 ignored)."""
    model = gpt2()
    data = token_data(10, seed=3)
    ids, labels = data["input_ids"], data["labels"].clone()
    labels[:, -1] = -100  # the last position has no next token
    curve = ablation_curve(model, ids, labels, layers=None, num_orderings=2,
                           fractions=torch.linspace(0, 1, 5), memory_budget=2**22)  # fmt: skip
    blocks = model.model.transformer.h
    names = [f"model.transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert curve.num_units == dict.fromkeys(names, 128)
    acts = {f"model.transformer.h.{i}.mlp.act": blocks[i].mlp.act for i in range(2)}
    for r, order in enumerate(curve.orderings):
        for k, count in enumerate(curve.counts.tolist()):
            keep = torch.ones(256, dtype=torch.bool)
            keep[order[:count]] = False
            masks = dict(zip(acts, keep.split(128)))
            logits = hooked(model, acts, masks, lambda: model(ids))
            assert float(curve.accuracy[r, k]) == pytest.approx(token_accuracy(logits, labels))


def test_gpt2_unit_ablation_impact_is_the_token_cross_entropy_change():
    model = gpt2()
    data = token_data(6, seed=4)
    ids, labels = data["input_ids"], data["labels"]
    layer = "model.transformer.h.1.mlp.c_fc"
    impact = unit_ablation_impact(model, ids, labels, layers=layer)[layer]
    act = {"act": model.model.transformer.h[1].mlp.act}

    def loss(keep):
        logits = hooked(model, act, {"act": keep}, lambda: model(ids))
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    base = loss(torch.ones(128, dtype=torch.bool))
    for j in (0, 17, 127):
        keep = torch.ones(128, dtype=torch.bool)
        keep[j] = False
        torch.testing.assert_close(impact[j], loss(keep) - base, rtol=1e-9, atol=1e-12)


def test_gpt2_conv1d_unit_activity_and_selectivity_average_over_positions():
    model = gpt2(relu=True)
    data = token_data(12, seed=5)
    ids, y = data["input_ids"], data["input_ids"][:, 0] % 3
    layer = "model.transformer.h.0.mlp.c_fc"
    rec = {}
    handle = model.model.transformer.h[0].mlp.act.register_forward_hook(
        lambda m, a, out: rec.setdefault("h", out.detach().clone())
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    want = rec["h"].mean(1)  # [n, 128]: each feature averaged over the 12 positions
    got = unit_activity(model, ids, layers=layer, chunk_size=5)[layer]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    si = class_selectivity(model, ids, y, layers=layer, num_classes=3)[layer]
    means = torch.stack([want[y == c].mean(0) for c in range(3)])
    top = means.max(0).values
    rest = (means.sum(0) - top) / 2
    ref = torch.where(top + rest > 0, (top - rest) / (top + rest), torch.zeros_like(top))
    assert si.shape == (128,)
    torch.testing.assert_close(si, ref, rtol=1e-10, atol=1e-12)


def test_hf_activations_are_followed_and_signed_activity_is_refused():
    model = gpt2()
    ids = token_data(4)["input_ids"]
    layer = "model.transformer.h.0.mlp.c_fc"
    point = ablation_points(model, ids, layer)[layer]
    assert point.name == "model.transformer.h.0.mlp.act" and point.num_units == 128
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"'model.transformer.h.0.mlp.act' \(NewGELUActivation\)"):
        class_selectivity(model, ids, y, layers=layer, num_classes=3)
    with pytest.raises(ValueError, match="raw output can be negative"):
        class_selectivity(model, ids, y, layers=layer, num_classes=3, follow_activation=False)


def test_resnet_downsample_selectivity_is_refused_and_relu_points_stay_in_range():
    torch.manual_seed(0)
    model = ResNet18(width=4).double().eval()
    x = torch.randn(12, 3, 32, 32, dtype=torch.float64)
    y = torch.arange(12) % 3
    with pytest.raises(ValueError, match=r"layer 'layer2.0.downsample.0'.*BatchNorm2d"):
        class_selectivity(model, x, y, layers="layer2.0.downsample.0", num_classes=3)
    si = class_selectivity(model, x, y, layers="conv1", num_classes=3)["conv1"]  # -> bn1 -> relu
    rec = {}
    handle = model.relu.register_forward_hook(lambda m, a, o: rec.setdefault("h", o.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    act = rec["h"].mean((2, 3))
    means = torch.stack([act[y == c].mean(0) for c in range(3)])
    top = means.max(0).values
    rest = (means.sum(0) - top) / 2
    torch.testing.assert_close(si, (top - rest) / (top + rest), rtol=1e-10, atol=1e-12)
    assert bool(((si >= 0) & (si <= 1)).all())


def test_selectivity_index_refuses_negative_class_means():
    with pytest.raises(ValueError, match="non-negative class-conditional means"):
        selectivity_index(torch.tensor([[1.0, 0.5], [-0.9, 0.2]]))
