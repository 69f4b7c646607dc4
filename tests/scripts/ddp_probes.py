"""Probe sets for ``ddp_fit.py``: each factory returns ``(callbacks, max_steps)``."""

from __future__ import annotations

import torch
from torch import nn

from lightning_probes.callbacks.base import ProbeCallback


class GradNormProbe(ProbeCallback):
    """Full-probe-set gradient norm: identical on every rank only if the probe sets agree."""

    probe_name = "gradnorm"
    needs_grad = True
    default_schedule = {"every_n_steps": 2}

    def probe(self, trainer, pl_module, data):
        loss = nn.functional.cross_entropy(pl_module(data.inputs), data.targets)
        grads = torch.autograd.grad(loss, list(pl_module.parameters()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        self.log_scalars(trainer, pl_module, {self.key("norm"): norm, self.key("loss"): loss})


def base_probe():
    # the second one is over its (tiny) budget at every scheduled step: rank zero's decision
    # to skip is broadcast, so both ranks skip together
    return [GradNormProbe(probe_size=32), GradNormProbe(every_n_steps=3, max_overhead=1e-9)], 6


def all_probes():
    """Every probe at once, cheap settings; ablation stops training on its own AUC."""
    import lightning_probes as lp

    return [
        lp.LayerCKACallback(every_n_steps=2, probe_size=16, on_error="raise"),
        lp.LossContributionCallback(
            every_n_steps=1, probe_size=32, method="simpson", on_error="raise"
        ),
        lp.AblationAUCCallback(
            every_n_steps=1,
            probe_size=32,
            num_orderings=3,
            num_points=5,
            early_stopping=True,
            patience=1,
            min_delta=1.0,  # no run can improve by 1.0: stop after the second run
            on_error="raise",
        ),
        lp.SelectivityCallback(every_n_steps=2, probe_size=32, on_error="raise"),
        lp.NADCallback(every_n_steps=2, probe_size=16, num_networks=16, on_error="raise"),
        lp.LandscapeCallback(every_n_steps=2, probe_size=16, plane_resolution=3, on_error="raise"),
    ], 8


def failing_rank():
    """Ablation with early stopping whose run fails on rank 1 only (an OOM): rank 0 must not
    wait for ever in the early-stopping collective, and rank 1 warns itself."""
    import lightning_probes as lp

    class FailingOnRank1(lp.AblationAUCCallback):
        def _measure(self, pl_module, data):
            if pl_module.global_rank == 1:
                raise torch.OutOfMemoryError("simulated: 12.00 GiB needed")
            return super()._measure(pl_module, data)

    class StartsOutOfMemoryOnRank1(lp.LandscapeCallback):
        def validate(self, pl_module, data):  # fit-start work out of memory on rank 1 only
            if pl_module.global_rank == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.")
            super().validate(pl_module, data)

    return [
        FailingOnRank1(
            every_n_steps=1, probe_size=32, num_orderings=3, num_points=5,
            early_stopping=True, patience=1, min_delta=1.0,
        ),
        StartsOutOfMemoryOnRank1(every_n_steps=1, probe_size=16, plane_every_n_runs=0),
    ], 6  # fmt: skip
