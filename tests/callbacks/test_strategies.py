"""FSDP1 and DeepSpeed are refused at ``setup`` by every probe, naming probe and strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import TinyClassifier
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

import lightning_probes as lp
from lightning_probes.callbacks.strategies import check_strategy

PROBES = [
    lp.LossContributionCallback,
    lp.AblationAUCCallback,
    lp.SelectivityCallback,
    lp.LayerCKACallback,
    lp.NADCallback,
    lp.LandscapeCallback,
]


class DeepSpeedStrategy(DDPStrategy):
    """Stands for Lightning's (deepspeed is not installed): recognised by its class name."""


class MyDeepSpeed(DeepSpeedStrategy):
    pass


@pytest.mark.parametrize("probe", PROBES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("strategy", "named"),
    [(FSDPStrategy(), "FSDPStrategy"), (MyDeepSpeed(), "MyDeepSpeed` (DeepSpeedStrategy")],
    ids=["fsdp1", "deepspeed"],
)
def test_sharding_strategies_without_whole_weights_are_refused_at_setup(probe, strategy, named):
    trainer = SimpleNamespace(strategy=strategy, loggers=[])
    with pytest.raises(ValueError) as err:
        probe().setup(trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]
    message = str(err.value)
    assert message.startswith(f"{probe.__name__} does not support `{named}")
    assert 'strategy="ddp"' in message and "ModelParallelStrategy" in message


@pytest.mark.parametrize("strategy", [DDPStrategy(), ModelParallelStrategy(), None])
def test_ddp_fsdp2_and_single_device_pass(strategy):
    check_strategy(SimpleNamespace(strategy=strategy), "Probe")


def test_tensor_parallel_parameters_are_refused_at_fit_start_naming_the_probe():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    from lightning_probes.callbacks.strategies import probe_model

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = TinyClassifier()
        parallelize_module(model.net, init_device_mesh("cpu", (1,)), {"3": RowwiseParallel()})
        with pytest.raises(ValueError, match=r"^LandscapeCallback: .*\(net\.3\.weight, "):
            probe_model(model, "LandscapeCallback")
    finally:
        dist.destroy_process_group()
