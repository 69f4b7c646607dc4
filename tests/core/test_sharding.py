"""The unsharded replica of an FSDP2 model, on a one-process gloo group (2 ranks: test_fsdp2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from lightning_probes.core.sharding import (
    check_unshardable,
    full_parameters,
    is_sharded,
    unsharded_replica,
)


@pytest.fixture(scope="module")
def mesh():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_replica_is_the_plain_network_with_whole_weights_and_user_hooks(mesh):
    net, reference = make_net(), make_net()
    calls = []
    net[2].register_forward_hook(lambda m, i, o: calls.append(type(m)))  # the user's: kept
    fully_shard(net[0], mesh=mesh)
    fully_shard(net, mesh=mesh)
    assert is_sharded(net) and isinstance(net[0].weight, DTensor)
    x = torch.randn(5, 4)

    replica = unsharded_replica(net)
    assert [type(m) for m in replica.modules()] == [type(m) for m in reference.modules()]
    assert not any(isinstance(p, DTensor) for p in replica.parameters())
    for (name, p), (_, q) in zip(replica.named_parameters(), reference.named_parameters()):
        assert type(p) is nn.Parameter and torch.equal(p, q), name
    # FSDP's own hooks are left out: its gathers would overwrite functional_call's weights
    assert not replica._forward_pre_hooks and not replica[0]._forward_pre_hooks
    calls.clear()
    torch.testing.assert_close(replica(x), reference(x), rtol=0, atol=0)
    assert calls == [nn.Linear]
    other = {k: torch.randn_like(v) for k, v in reference.named_parameters()}
    torch.testing.assert_close(
        functional_call(replica, other, (x,)), functional_call(reference, other, (x,))
    )
    copy.deepcopy(replica)  # NAD's fresh networks (the FSDP model refuses deepcopy)
    # the original is untouched: still sharded, its hooks in place
    assert isinstance(net, FSDPModule) and isinstance(net[0].weight, DTensor)
    assert net._forward_pre_hooks and len(net[2]._forward_hooks) == 1
    torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)
    whole = full_parameters(net)
    assert not any(isinstance(v, DTensor) for v in whole.values())
    assert all(torch.equal(whole[k], v) for k, v in reference.named_parameters())


def test_tensor_parallel_parameters_are_refused(mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    net = make_net()
    parallelize_module(net, mesh, {"0": ColwiseParallel()})
    with pytest.raises(ValueError, match=r"tensor-parallel parameters \(0.weight, 0.bias\)"):
        check_unshardable(net)
    with pytest.raises(ValueError, match="FSDP2"):
        unsharded_replica(net)


def test_a_plain_model_is_its_own_replica_and_its_parameters_are_views():
    net = make_net()
    assert not is_sharded(net) and unsharded_replica(net) is net
    check_unshardable(net)
    whole = full_parameters(net)
    assert all(v.data_ptr() == p.data_ptr() for v, p in zip(whole.values(), net.parameters()))


def test_a_model_fsdp2_has_unsharded_for_now_still_gets_a_replica_without_fsdp(mesh):
    net, reference = make_net(), make_net()
    fully_shard(net, mesh=mesh, reshard_after_forward=False)
    net.unshard()  # FSDP2 registers the gathered, plain parameters until the next reshard
    assert not any(isinstance(p, DTensor) for p in net.parameters()) and is_sharded(net)
    replica = unsharded_replica(net)
    assert type(replica) is nn.Sequential and not replica._forward_pre_hooks
    assert all(torch.equal(p, q) for p, q in zip(replica.parameters(), reference.parameters()))
    net.reshard()
