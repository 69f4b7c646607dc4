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
    return [GradNormProbe(probe_size=32)], 6
