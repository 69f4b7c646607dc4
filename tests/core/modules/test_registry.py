"""The layer-type registry: lookup through the MRO, exact lookup, errors, user entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_probes.core.modules import (
    CONV_TYPES,
    ConvOps,
    LayerOps,
    LinearOps,
    ops_for,
    register,
    unregister,
)


class MyLinear(nn.Linear):
    pass


class Unknown(nn.Module):
    def forward(self, x):
        return x


def test_lookup_walks_the_mro_and_exact_matches_the_type_only():
    assert isinstance(ops_for(nn.Linear(2, 3)), LinearOps)
    assert ops_for(MyLinear(2, 3)) is ops_for(nn.Linear(2, 3))  # a subclass is a Linear
    assert ops_for(MyLinear(2, 3), exact=True) is None  # it may override forward
    assert ops_for(nn.Linear(2, 3), exact=True) is ops_for(nn.Linear(2, 3))
    assert [ops_for(t(1, 1, 1)).spatial_dims for t in CONV_TYPES] == [1, 2, 3]
    assert all(isinstance(ops_for(t(1, 1, 1)), ConvOps) for t in CONV_TYPES)
    # batch norm of any kind by subclass; the exact types the landscape chain accepts
    assert ops_for(nn.SyncBatchNorm(3)).channelwise
    assert ops_for(nn.SyncBatchNorm(3), exact=True) is None
    assert ops_for(nn.BatchNorm2d(3), exact=True).jointly_affine
    assert ops_for(nn.InstanceNorm2d(3)).passes_units
    assert not ops_for(nn.InstanceNorm2d(3)).channelwise


def test_unknown_layers_have_no_entry_and_non_modules_are_refused():
    assert ops_for(Unknown()) is None
    assert ops_for(nn.Softmax(dim=1)) is None
    with pytest.raises(TypeError, match="Expected an nn.Module instance, got Tensor"):
        ops_for(torch.zeros(2))  # type: ignore[arg-type]


def test_register_checks_its_arguments():
    with pytest.raises(TypeError, match="Expected `layer_type` to be a subclass of torch.nn"):
        register(int, LinearOps())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `ops` to be a LayerOps instance"):
        register(Unknown, LinearOps)  # type: ignore[arg-type]


def test_register_replaces_and_unregister_removes():
    try:
        register(Unknown, LayerOps())
        first = ops_for(Unknown())
        assert first is not None and first.unit_dim == 1
        register(Unknown, LinearOps())
        assert isinstance(ops_for(Unknown(), exact=True), LinearOps)
    finally:
        unregister(Unknown)
    assert ops_for(Unknown()) is None
    unregister(Unknown)  # a no-op


def test_one_elementwise_set_with_per_use_properties():
    """Every activation may end a sparse ablation chain; the landscape chain folds all but
    those it never accepted (and PReLU's parameter stops it there anyway)."""
    for layer in (nn.ReLU(), nn.GELU(), nn.PReLU(), nn.LogSigmoid(), nn.Threshold(0.1, 0.0)):
        assert ops_for(layer).activation
    assert ops_for(nn.ReLU6()).foldable and ops_for(nn.PReLU()).foldable
    assert not ops_for(nn.LogSigmoid()).foldable and not ops_for(nn.Threshold(0.1, 0.0)).foldable
    assert ops_for(nn.ReLU(), exact=True).pointwise is torch.relu
    assert ops_for(nn.GELU()).pointwise is None
    assert ops_for(nn.Identity()).channelwise and not ops_for(nn.Identity()).activation
    assert ops_for(nn.MaxPool2d(2)).foldable and not ops_for(nn.MaxPool2d(2)).channelwise
    assert not ops_for(nn.Flatten(0)).per_sample(nn.Flatten(0))
    assert not ops_for(nn.Dropout()).per_sample(nn.Dropout().train())
    assert ops_for(nn.Dropout()).per_sample(nn.Dropout().eval())
