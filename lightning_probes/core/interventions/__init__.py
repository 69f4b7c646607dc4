"""Interventions on activations (Morcos et al., ICLR 2018).

Probe points, masks, shortcuts,
the evaluation engine; cumulative ablation curves and class selectivity.

The public names of ``lightning_probes.core.interventions`` are re-exported here.
"""

from lightning_probes.core.interventions.engine import (
    CONV_TYPES,
    AblationPoint,
    Apply,
    Layers,
    Masks,
    Trace,
    build_masks,
    evaluate_interventions,
    has_module_of_type,
    point_statistics,
    trace_model,
    unit_view,
)

__all__ = [
    "CONV_TYPES",
    "AblationPoint",
    "Apply",
    "Layers",
    "Masks",
    "Trace",
    "build_masks",
    "evaluate_interventions",
    "has_module_of_type",
    "point_statistics",
    "trace_model",
    "unit_view",
]
