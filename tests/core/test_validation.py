import pytest
import torch
from torch import nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.validation import check_probe_loss


class Net(nn.Module):
    def __init__(self, functional_dropout=False):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.functional_dropout = functional_dropout

    def forward(self, x):
        h = self.fc(x)
        if self.functional_dropout:
            h = nn.functional.dropout(h, 0.3, training=True)  # active in eval too
        return h


def data(n=6, targets=None):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g) if targets is None else targets
    return ProbeSet(torch.randn(n, 4, generator=g), y)


def test_accepts_a_deterministic_model_and_restores_rng_and_mode():
    net = Net().train()
    state = torch.get_rng_state()
    check_probe_loss(net, data(), probe="LCA")
    assert net.training and torch.equal(torch.get_rng_state(), state)


def test_refuses_a_random_op_active_in_eval():
    with pytest.raises(ValueError, match="differs between two evaluations"):
        check_probe_loss(Net(functional_dropout=True), data(), probe="LCA")


def test_refuses_mismatched_targets_naming_the_arguments():
    bad = data(targets=torch.randint(0, 3, (6, 5)))
    with pytest.raises(ValueError, match=r"could not be evaluated.*`loss_fn=") as err:
        check_probe_loss(Net(), bad, probe="Landscape")
    assert "output_fn=" in str(err.value)
    with pytest.raises(ValueError, match="with targets"):
        check_probe_loss(Net(), ProbeSet(torch.randn(3, 4), None), probe="LCA")
