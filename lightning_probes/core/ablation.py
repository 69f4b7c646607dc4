"""Public path of the ablation functions (DESIGN.md, "Public contracts").

The code lives in
:mod:`lightning_probes.core.ablation`.
"""

from lightning_probes.core.interventions.ablation import (
    AblationCurve,
    AblationValue,
    NoiseCurve,
    ablation_curve,
    ablation_points,
    default_ablation_layers,
    noise_curve,
)

__all__ = [
    "AblationCurve",
    "AblationValue",
    "NoiseCurve",
    "ablation_curve",
    "ablation_points",
    "default_ablation_layers",
    "noise_curve",
]
