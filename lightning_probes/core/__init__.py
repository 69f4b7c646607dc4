"""Torch machinery on an ``nn.Module``: layers, scoped hooks, isolation, probe data.

Nothing here imports Lightning; a plain PyTorch loop can use it directly.
"""

from lightning_probes.core.data import ProbeSet, default_batch_to_inputs_targets, draw_probe_set
from lightning_probes.core.hooks import Captured, capture, count_calls, replace_output
from lightning_probes.core.isolation import isolated
from lightning_probes.core.layers import select_layers

__all__ = [
    "Captured",
    "ProbeSet",
    "capture",
    "count_calls",
    "default_batch_to_inputs_targets",
    "draw_probe_set",
    "isolated",
    "replace_output",
    "select_layers",
]
