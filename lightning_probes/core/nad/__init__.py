"""Neural Anisotropy Directions (Ortiz-Jimenez et al., NeurIPS 2020).

Directions, the chunked
evaluator, and the secant shortcuts (first layer, local prefix, second stage).

The public names of ``lightning_probes.core.nad`` are re-exported here.
"""

from lightning_probes.core.nad.directions import (
    ModelFactory,
    NADResult,
    fresh_network_factory,
    input_gradient_energy,
    network_gradients,
    neural_anisotropy_directions,
)
from lightning_probes.core.nad.evaluator import GradientEstimator

__all__ = [
    "GradientEstimator",
    "ModelFactory",
    "NADResult",
    "fresh_network_factory",
    "input_gradient_energy",
    "network_gradients",
    "neural_anisotropy_directions",
]
