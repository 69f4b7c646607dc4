"""``nn.MultiheadAttention`` as one kernel layer (issue 14, item 5): all its parameters
(``out_proj``'s included), its attention output ``output[0]``, its sample axis in both layouts,
its masks; against float64 ``torch.func`` Jacobians of the whole model's logits."""

from __future__ import annotations

import pytest
import torch
from reference import reference_kernels
from torch import nn

from lightning_probes.core.axes import find_sample_axes
from lightning_probes.core.kernels import layer_tangent_kernels, resolve_layers

pytest.importorskip("transformers")

from real_models import SeqEncoder, token_data

# the reference differentiates the model's own MHA call, on CPU through the fused attention
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

ATTN = "encoder.layers.0.self_attn"


def assert_close_kernels(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(
            got[name], want[name], rtol=1e-7, atol=1e-10 * want[name].abs().max()
        )


def seq_encoder(batch_first):
    torch.manual_seed(0)
    return SeqEncoder(batch_first=batch_first).double().eval()


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_kernel_is_over_all_its_parameters(batch_first):
    """The kernel of the attention block: J J^T with J w.r.t. in_proj and out_proj; the
    samples sit on axis 1 of [L, n, E] by default. Before: refused (a tuple output)."""
    net = seq_encoder(batch_first)
    ids = token_data(5, classes=3)["input_ids"]
    attn = net.get_submodule(ATTN)
    axis = find_sample_axes(net, ids, {ATTN: attn})[ATTN]
    assert axis == (0 if batch_first else 1)
    got = layer_tangent_kernels(net, ids, layers=ATTN, chunk_size=3)
    want = reference_kernels(net, ids, [ATTN], recurse=True)
    assert_close_kernels(got, want)
    # the block's own parameters alone (in_proj) give another kernel: out_proj counts
    alone = reference_kernels(net, ids, [ATTN])[ATTN]
    assert (alone - want[ATTN]).abs().max() > 1e-2 * want[ATTN].abs().max()


@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_defaults_take_attention_as_one_layer(batch_first):
    """Default layers: each self-attention block (not its out_proj), linear1, linear2, head."""
    net = seq_encoder(batch_first)
    ids = token_data(4, classes=3)["input_ids"]
    blocks = [
        f"encoder.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn", "linear1", "linear2")
    ]
    assert list(resolve_layers(net, None)) == [*blocks, "head"]  # without a forward, too
    got = layer_tangent_kernels(net, ids)
    assert list(got) == [*blocks, "head"]
    assert_close_kernels(got, reference_kernels(net, ids, list(got), recurse=True))
    with pytest.raises(ValueError, match=f"'{ATTN}.out_proj', whose parameters are part of "
                       f"layer '{ATTN}' \\(MultiheadAttention"):  # fmt: skip
        layer_tangent_kernels(net, ids, layers=[ATTN, f"{ATTN}.out_proj"])


class MaskedAttention(nn.Module):
    """Token ids -> cross-attention (kdim/vdim, bias_kv) with a padding mask and an attention
    mask, shared ``[L, S]`` or per sample ``[n·H, L, S]`` -> mean -> Linear."""

    def __init__(self, batch_first, per_sample_mask, d=8, heads=2):
        super().__init__()
        self.batch_first, self.per_sample_mask, self.heads = batch_first, per_sample_mask, heads
        self.embed = nn.Embedding(48, d)
        self.memory = nn.Embedding(48, 6)
        self.attn = nn.MultiheadAttention(
            d, heads, kdim=6, vdim=5, add_bias_kv=True, batch_first=batch_first
        )
        self.value = nn.Linear(6, 5)
        self.head = nn.Linear(d, 3)

    def forward(self, ids, pad):  # ids [n, L], pad [n, L] (True: ignored key)
        q, k = self.embed(ids), self.memory(ids.flip(1))
        length = ids.shape[1]
        if self.per_sample_mask:  # from the tokens, one per head: [n·H, L, S]
            pair = (
                ids[:, None, :, None]
                + ids[:, None, None, :]
                + torch.arange(self.heads)[:, None, None]
            )
            mask = (pair % 3 == 0).reshape(-1, length, length)
        else:  # causal
            mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        q, k, v = q, k, self.value(k)
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out = self.attn(q, k, v, key_padding_mask=pad, attn_mask=mask)[0]
        return self.head(out.tanh().mean(1 if self.batch_first else 0))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("per_sample_mask", [False, True])
def test_attention_with_masks_and_separate_key_value_sizes(batch_first, per_sample_mask):
    torch.manual_seed(0)
    net = MaskedAttention(batch_first, per_sample_mask).double().eval()
    ids = token_data(5, classes=3)["input_ids"][:, :6]
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[1, 4:] = pad[3, 2:] = True
    inputs = {"ids": ids, "pad": pad}
    assert list(resolve_layers(net, None, inputs=inputs)) == ["attn", "value", "head"]
    got = layer_tangent_kernels(net, inputs, layers=["attn"], chunk_size=2)
    want = reference_kernels(net, inputs, ["attn"], recurse=True)
    assert_close_kernels(got, want)
    assert len(dict(net.attn.named_parameters())) == 8  # q/k/v_proj, bias, bias_k/v, out_proj


class AcrossTheBatch(nn.Module):
    """A sequence-first attention fed batch-first tensors: it attends across the samples."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)  # batch_first=False: expects [L, n, E]
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x [n, L, 4], read by the attention as [L', n', E]
        return self.head(self.attn(x, x, x)[0].mean(1))


def test_attention_mixing_the_samples_is_refused():
    """Its output follows the samples on axis 0, which for this layout is the sequence axis:
    a per-sample kernel would be a silently wrong number."""
    torch.manual_seed(0)
    net = AcrossTheBatch().double().eval()
    x = torch.randn(4, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'attn' \(MultiheadAttention\): Expected query, key "
                       r"and value with the 4 samples on axis 1 \(batch_first"):  # fmt: skip
        layer_tangent_kernels(net, x, layers="attn")
