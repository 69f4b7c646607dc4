"""Issue 16: every Linear, HF ``Conv1D`` and Conv layer of a real model takes the factor path.

Linear over sequences (sequence-first ``nn.TransformerEncoder``, BERT), GPT-2's ``Conv1D`` and
a ResNet's convolutions get :class:`AffineFactors` (forward/backward factors), never the
:mod:`torch.func` per-sample fallback (:class:`JacobianFactors`), which is kept for the layers
that have no factors (``nn.MultiheadAttention``). Values are checked elsewhere against float64
``jacrev`` kernels (``test_real_layouts.py``, ``test_real_resnet_paths.py``).
"""

from __future__ import annotations

import pytest
import torch
from real_models import GPT2LM, BertClassifier, ResNet18, SeqEncoder, token_data
from torch import nn

from lightning_probes.core.kernels import tangent_kernel_factors
from lightning_probes.core.kernels.factors import AffineFactors, JacobianFactors


def _factors(name: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2LM().eval()
        ids = token_data(4)["input_ids"]
        return model, tangent_kernel_factors(model, ids, output_fn=lambda out: out[:, -1, :5])
    if name == "bert":
        model = BertClassifier().eval()
        data = token_data(4, classes=3)
        inputs = {k: data[k] for k in ("input_ids", "attention_mask")}
        return model, tangent_kernel_factors(model, inputs)
    if name == "resnet":
        model = ResNet18(width=4).eval()
        return model, tangent_kernel_factors(model, torch.randn(4, 3, 32, 32))
    model = SeqEncoder(batch_first=False).eval()  # Linear on [L, n, d]
    return model, tangent_kernel_factors(model, token_data(4, classes=3)["input_ids"])


@pytest.mark.parametrize("name", ["gpt2", "bert", "resnet", "seq_first_encoder"])
def test_linear_conv1d_and_conv_layers_take_the_factor_path(name):
    from transformers.pytorch_utils import Conv1D

    model, factors = _factors(name)
    modules = dict(model.named_modules())
    affine = (nn.Linear, nn.Conv2d, Conv1D)
    kinds = {type(modules[k]).__name__ for k in factors}
    assert kinds & {"Linear", "Conv2d", "Conv1D"}
    for layer, f in factors.items():
        if isinstance(modules[layer], affine):
            assert isinstance(f, AffineFactors), (layer, type(f).__name__)
        else:
            assert isinstance(f, JacobianFactors) and isinstance(
                modules[layer], nn.MultiheadAttention
            ), layer
