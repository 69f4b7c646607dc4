import pytest
from torch import nn

from lightning_probes.core.layers import select_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4, bias=False))
        self.head = nn.Linear(4, 2)
        self.empty = nn.Identity()


def test_default_selects_linear_and_conv_with_parameters_in_order():
    assert list(select_layers(Net())) == ["conv", "block.0", "block.2", "head"]


def test_default_skips_parameterless_layers():
    lin = nn.Linear(3, 3)
    lin._parameters.clear()
    net = nn.Sequential(lin, nn.Linear(3, 2))
    assert list(select_layers(net)) == ["1"]


def test_names_globs_and_types():
    net = Net()
    assert list(select_layers(net, include="head")) == ["head"]
    assert list(select_layers(net, include=["head", "block.*"])) == [
        "block.0",
        "block.1",
        "block.2",
        "head",
    ]
    assert list(select_layers(net, include="block.*", types=nn.Linear)) == ["block.0", "block.2"]
    assert list(select_layers(net, types=[nn.LayerNorm])) == ["block.1"]
    assert select_layers(net, include="conv")["conv"] is net.conv


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(
        ValueError,
        match=r"Layer 'fc9' not found in Net\. Available layers are: conv \(Conv2d\), act \(ReLU\)",
    ):
        select_layers(Net(), include="fc9")


def test_empty_default_selection_is_an_error():
    with pytest.raises(ValueError, match="No layer of type Linear, Conv1d, Conv2d, Conv3d"):
        select_layers(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))


def test_bad_argument_types():
    with pytest.raises(TypeError, match="Expected `include` to be a str or a sequence of str"):
        select_layers(Net(), include=[3])
    with pytest.raises(TypeError, match="Expected `types` to be nn.Module subclasses"):
        select_layers(Net(), types=[int])


def test_check_layer_spec():
    from lightning_probes.core.layers import check_layer_spec

    check_layer_spec(None)
    check_layer_spec("net.*")
    check_layer_spec(["a", "b"])
    with pytest.raises(
        ValueError, match="Expected `layers` to name at least one layer, got an empty list"
    ):
        check_layer_spec([])
    with pytest.raises(
        TypeError,
        match=r"Expected `layers` to be None, a layer name/glob or a list of them, got \[1\]",
    ):
        check_layer_spec([1])
