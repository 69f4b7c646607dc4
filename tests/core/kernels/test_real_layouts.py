"""Layer tangent kernels on real models (issue 14): sequence-first layers, dict inputs, HF
``Conv1D``, tied weights, language-model logits; against float64 ``torch.func`` references."""

from __future__ import annotations

import pytest
import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.kernels import layer_tangent_kernels, resolve_layers
from lightning_probes.core.kernels.estimate import estimate_layer_alignments

pytest.importorskip("transformers")

from real_models import GPT2LM, SEQ, BertClassifier, SeqEncoder, token_data

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def assert_close_kernels(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-7, atol=1e-10 * want[name].abs().max()
        )


def seq_encoder(batch_first=False):
    torch.manual_seed(0)
    return SeqEncoder(batch_first=batch_first).double().eval()


SEQ_LAYERS = [
    "embed",
    "encoder.layers.0.linear1",
    "encoder.layers.0.linear2",
    "encoder.layers.0.norm1",
    "encoder.layers.1.norm2",
    "head",
]


@pytest.mark.parametrize("n", [SEQ, 5])  # T == n, then T != n
@pytest.mark.parametrize(("method", "chunk_size"), [("auto", None), ("func", 4)])
def test_sequence_first_encoder_matches_torch_func(n, method, chunk_size):
    """`nn.TransformerEncoderLayer(batch_first=False)` sees [T, n, d]: before, the kernels of
    linear1/linear2/norm1 were wrong when T == n and raised when T != n."""
    net = seq_encoder()
    ids = token_data(n, classes=3)["input_ids"]
    got = layer_tangent_kernels(net, ids, layers=SEQ_LAYERS, method=method, chunk_size=chunk_size)
    assert_close_kernels(got, reference_kernels(net, ids, SEQ_LAYERS))


@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_default_layers_run_and_match(batch_first):
    """The default layers are the layers that run: MHA's out_proj (used by MultiheadAttention
    without being called, "exactly once per forward, got 0 calls" before) is left out, the
    attention block is one layer with all its parameters (test_attention_kernels.py)."""
    net = seq_encoder(batch_first)
    ids = token_data(6, classes=3)["input_ids"]
    got = layer_tangent_kernels(net, ids, chunk_size=4)
    blocks = [
        f"encoder.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn", "linear1", "linear2")
    ]
    assert list(got) == [*blocks, "head"]
    assert_close_kernels(got, reference_kernels(net, ids, list(got), recurse=True))
    with pytest.raises(ValueError, match="'encoder.layers.0.self_attn.out_proj' to run exactly "
                       "once per forward, got 0 calls.*MultiheadAttention.out_proj"):  # fmt: skip
        layer_tangent_kernels(net, ids, layers="encoder.layers.0.self_attn.out_proj")


class Scale(nn.Module):
    """A layer type with no registry entry: ``x * weight`` on the last axis."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.weight


class SeqFirstScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = Scale(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x [n, T, 4]
        h = self.scale(self.lin(x).transpose(0, 1))  # [T, n, 4]
        return self.head(h.tanh().sum(0))


def test_sample_axis_refused_for_an_unknown_layer_type():
    torch.manual_seed(0)
    net = SeqFirstScale().double().eval()
    x = torch.randn(3, 3, 4, dtype=torch.float64)  # T == n
    with pytest.raises(ValueError, match=r"'scale' \(Scale\) to hold the samples on axis 0 of its "
                       r"output, got them on axis 1 of \(3, 3, 4\).*moves_samples"):  # fmt: skip
        layer_tangent_kernels(net, x, layers=["lin", "scale"])
    got = layer_tangent_kernels(net, x, layers=["lin", "head"])
    assert_close_kernels(got, reference_kernels(net, x, ["lin", "head"]))


def test_bert_dict_inputs_with_attention_mask():
    """Dict inputs reach the model as keyword arguments, chunks slice every tensor: the kernels
    equal a torch.func reference called with the mask by hand, and the mask matters."""
    torch.manual_seed(0)
    model = BertClassifier().double().eval()
    data = token_data(7, classes=3)
    inputs = {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]}
    assert (inputs["attention_mask"] == 0).any()
    names = [
        "model.bert.encoder.layer.0.attention.self.query",
        "model.bert.encoder.layer.1.output.dense",
        "model.bert.encoder.layer.1.output.LayerNorm",
        "model.classifier",
    ]
    got = layer_tangent_kernels(model, inputs, layers=names, chunk_size=3)
    want = reference_kernels(model, inputs, names)
    assert_close_kernels(got, want)
    unmasked = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    other = layer_tangent_kernels(model, unmasked, layers=names[:1])[names[0]]
    assert (other - want[names[0]]).abs().max() > 1e-3 * want[names[0]].abs().max()
    defaults = resolve_layers(model, None, inputs=inputs)
    assert "model.classifier" in defaults and "model.bert.pooler.dense" in defaults
    # the matrix-free estimator's label term is exact: y^T K y with centred one-hot labels
    y = nn.functional.one_hot(data["labels"], 3).double()
    y = (y - y.mean(0)).reshape(-1)
    est = estimate_layer_alignments(model, inputs, data["labels"], layers=names[-1:], num_probes=2)[
        names[-1]
    ]
    torch.testing.assert_close(est.label_energy, y @ want[names[-1]] @ y, rtol=1e-9, atol=0)


def last_position(out):
    return out[:, -1]


def test_gpt2_defaults_are_the_conv1d_layers_and_match_torch_func():
    """HF Conv1D (weight [in, out]) is a linear layer; lm_head, tied to wte, is left out of the
    defaults (before: only lm_head was selected) and refused by name when asked for."""
    torch.manual_seed(0)
    model = GPT2LM().double().eval()
    ids = token_data(3)["input_ids"]
    classes = [3, 0, 7]
    got = layer_tangent_kernels(model, ids, output_fn=last_position, classes=classes)
    blocks = [
        f"model.transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(got) == blocks
    want = reference_kernels(model, ids, blocks, output_fn=lambda out: out[:, -1][:, classes])
    assert_close_kernels(got, want)
    with pytest.raises(ValueError, match="'model.lm_head', whose 'weight' is the same parameter "
                       "as 'model.transformer.wte.weight' \\(tied weights\\)"):  # fmt: skip
        layer_tangent_kernels(model, ids, layers="model.lm_head", output_fn=last_position)


def test_language_model_logits_refused_with_an_example_and_the_memory():
    torch.manual_seed(0)
    model = GPT2LM().double().eval()
    ids = token_data(4)["input_ids"]
    # o = L * V = 12 * 48 = 576 outputs; (4 * 576)^2 float64 = 40.5 MiB
    with pytest.raises(ValueError, match=r"got \(4, 12, 48\).*o = 576.*\(4·576\)\^2 torch.float64 "
                       r"elements = 40.5 MiB.*output_fn=lambda out: out\[:, -1"):  # fmt: skip
        layer_tangent_kernels(model, ids, layers="model.transformer.h.0.mlp.c_fc")
    with pytest.raises(ValueError, match=r"\(4·48\)\^2 torch.float64 elements = 288 KiB per layer"):
        layer_tangent_kernels(model, ids, output_fn=last_position, max_kernel_bytes=2**10)


def test_classes_subset_is_the_kernel_restricted_to_those_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double().eval()
    x = torch.randn(5, 5, dtype=torch.float64)
    classes = [2, 0]
    got = layer_tangent_kernels(net, x, classes=classes, chunk_size=2)
    want = reference_kernels(net, x, ["0", "2"], output_fn=lambda out: out[:, classes])
    assert_close_kernels(got, want)
    full = layer_tangent_kernels(net, x)["0"].view(5, 4, 5, 4)
    torch.testing.assert_close(got["0"], full[:, classes][:, :, :, classes].reshape(10, 10))
    with pytest.raises(ValueError, match="`classes` to list distinct output columns"):
        layer_tangent_kernels(net, x, classes=[1, 1])


def test_one_sample():
    """One sample: a sample-first layer's kernel is computed; a sequence-first one is refused,
    its sample axis cannot be found by permuting samples."""
    net = seq_encoder()
    ids = token_data(3, classes=3)["input_ids"]
    got = layer_tangent_kernels(net, ids[:1], layers=["embed", "head"])
    assert_close_kernels(got, reference_kernels(net, ids[:1], ["embed", "head"]))
    with pytest.raises(ValueError, match="'encoder.layers.0.linear1' .*got an output of shape "
                       r"\(12, 1, 32\) \(for 1 samples\).*one distinct probe sample"):  # fmt: skip
        layer_tangent_kernels(net, ids[:1], layers="encoder.layers.0.linear1")
    same = ids[:1].expand(3, -1)  # identical samples: as for one
    with pytest.raises(ValueError, match="one distinct probe sample"):
        layer_tangent_kernels(net, same, layers="encoder.layers.0.linear1")
