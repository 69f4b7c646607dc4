"""Unit activity read before an in-place activation is the pre-activation (issue 14, item 8)."""

import torch
from torch import nn

from lightning_probes.core.interventions.selectivity import unit_activity


def test_activity_of_a_layer_followed_by_an_inplace_relu_is_its_own_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    with torch.no_grad():
        pre = net[0](x)  # by hand, no hooks
    assert (pre < 0).any()
    got = unit_activity(net, x, layers=["0"], follow_activation=False, chunk_size=16)["0"]
    torch.testing.assert_close(got, pre, rtol=0, atol=0)
    post = unit_activity(net, x, layers=["0"], follow_activation=True, chunk_size=16)["0"]
    torch.testing.assert_close(post, torch.relu(pre), rtol=0, atol=0)
