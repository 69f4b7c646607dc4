"""Interventions on activations (Morcos et al., ICLR 2018).

Probe points (:mod:`.points`, :mod:`.trace`), masks (:mod:`.masks`), shortcuts
(:mod:`.shortcuts`), the evaluation engine (:mod:`.engine`); cumulative ablation curves
(:mod:`.ablation`) and class selectivity (:mod:`.selectivity`).

The public names of ``lightning_probes.core.interventions`` are re-exported here.
"""

from lightning_probes.core.interventions.engine import (
    Apply,
    BatchMismatchError,
    evaluate_interventions,
)
from lightning_probes.core.interventions.masks import (
    Masks,
    build_masks,
    point_statistics,
    sum_is_finite,
    unit_view,
)
from lightning_probes.core.interventions.points import AblationPoint
from lightning_probes.core.interventions.shortcuts import ShortcutPath
from lightning_probes.core.interventions.trace import (
    Trace,
    default_ablation_layers,
    has_module_of_type,
    trace_model,
)
from lightning_probes.core.modules import CONV_TYPES

__all__ = [
    "CONV_TYPES",
    "AblationPoint",
    "Apply",
    "BatchMismatchError",
    "Masks",
    "ShortcutPath",
    "Trace",
    "build_masks",
    "default_ablation_layers",
    "evaluate_interventions",
    "has_module_of_type",
    "point_statistics",
    "sum_is_finite",
    "trace_model",
    "unit_view",
]
