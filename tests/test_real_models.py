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


def _token_ce(model, ids, labels):
    """Token-level cross-entropy written out as a loop over tokens (float64)."""
    with torch.no_grad():
        logits = model(ids).double()
        terms = [
            -torch.log_softmax(logits[i, t], 0)[labels[i, t]]
            for i in range(ids.shape[0])
            for t in range(ids.shape[1])
        ]
    return float(torch.stack(terms).mean())


def test_lca_on_a_language_model_logs_token_level_losses(tmp_path):
    """GPT-2 logits [n, L, V] with targets [n, L]: LCA runs with the default loss (it used to
    fail at every step with 'Expected target size'), and its loss and true loss change equal
    token-level cross-entropies computed by hand at the weights before and after the step."""
    import copy

    from conftest import make_trainer

    import lightning_probes as lp

    torch.manual_seed(0)
    model = GPT2LM()
    data = token_data(32)
    probe_ids, probe_labels = data["input_ids"][:8], data["labels"][:8]
    before = copy.deepcopy(model).eval()
    cb = lp.LossContributionCallback(
        every_n_steps=1, probe_data=(probe_ids, probe_labels), method="simpson", on_error="raise"
    )
    trainer = make_trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(model, dict_loader(data))
    log = trainer.logger
    after = model.eval()
    loss_after = _token_ce(after, probe_ids, probe_labels)
    loss_before = _token_ce(before, probe_ids, probe_labels)
    assert log.values_of("probes/lca/loss")[-1] == pytest.approx(loss_after, rel=1e-5)
    assert log.values_of("probes/lca/true_delta_loss")[-1] == pytest.approx(
        loss_after - loss_before, rel=1e-3, abs=1e-6
    )
    # lm_head's weight is wte's (tied): LCA counts the shared parameter once, so the layers'
    # allocations add up to the total and no layer is logged for the tied lm_head
    keys = {k for _, m in log.records for k in m if k.endswith("/lc") and k != "probes/lca/lc"}
    assert (
        "probes/lca/model.lm_head/lc" not in keys and "probes/lca/model.transformer.wte/lc" in keys
    )
    total = sum(log.values_of(k)[-1] for k in keys)
    assert total == pytest.approx(log.values_of("probes/lca/lc")[-1], rel=1e-4, abs=1e-7)


class _EvalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return nn.functional.dropout(self.fc(x), 0.3, training=True)  # random even in eval


@pytest.mark.parametrize("probe", ["lca", "landscape"])
def test_random_op_in_eval_and_unreadable_outputs_stop_fit_at_start(tmp_path, probe):
    from conftest import TinyClassifier, make_loader, make_trainer

    import lightning_probes as lp

    make = {
        "lca": lambda: lp.LossContributionCallback(every_n_steps=1, probe_size=16),
        "landscape": lambda: lp.LandscapeCallback(every_n_steps=1, probe_size=16),
    }[probe]
    module = TinyClassifier()
    module.net = _EvalDropout()
    trainer = make_trainer(tmp_path, [make()], max_steps=2)
    with pytest.raises(ValueError, match="differs between two evaluations"):
        trainer.fit(module, make_loader())
    assert trainer.global_step == 0

    class DictOut(TinyClassifier):
        def forward(self, x):
            return {"logits": self.net(x)}

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x)["logits"], y)

    trainer = make_trainer(tmp_path / "b", [make()], max_steps=2)
    with pytest.raises(ValueError, match="output_fn=") as err:
        trainer.fit(DictOut(), make_loader())
    assert trainer.global_step == 0 and "could not be evaluated" in str(err.value)


def test_landscape_on_bert_dict_inputs_matches_the_masked_loss(tmp_path):
    """The landscape probe used to fail at every run on dict inputs (`attention_mask` not
    passed); its loss and its plane's centre now equal the masked loss computed by hand."""
    from conftest import make_trainer

    import lightning_probes as lp

    torch.manual_seed(0)
    model = BertClassifier()
    data = token_data(24, classes=3)
    inputs = {"input_ids": data["input_ids"][:8], "attention_mask": data["attention_mask"][:8]}
    cb = lp.LandscapeCallback(
        every_n_steps=1, probe_data=(inputs, data["labels"][:8]), plane_resolution=3,
        on_error="raise",
    )  # fmt: skip
    trainer = make_trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(model, dict_loader(data))
    model.eval()
    with torch.no_grad():
        per = [
            nn.functional.cross_entropy(
                model(inputs["input_ids"][i : i + 1], inputs["attention_mask"][i : i + 1]),
                data["labels"][i : i + 1],
            )
            for i in range(8)
        ]
    want = float(torch.stack(per).mean())
    assert trainer.logger.values_of("probes/landscape/loss")[-1] == pytest.approx(want, rel=1e-5)
