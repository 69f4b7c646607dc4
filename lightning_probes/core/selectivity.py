"""Public path of the selectivity functions (DESIGN.md, "Public contracts").

The code lives in
:mod:`lightning_probes.core.selectivity`.
"""

from lightning_probes.core.interventions.selectivity import (
    class_selectivity,
    selectivity_trace,
    unit_ablation_impact,
    unit_activity,
    unit_mutual_information,
)

__all__ = [
    "class_selectivity",
    "selectivity_trace",
    "unit_ablation_impact",
    "unit_activity",
    "unit_mutual_information",
]
