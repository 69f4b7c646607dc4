"""Layer tangent kernels (Baratin et al. 2021; Lou et al., ICML 2022).

Capture, factors, the
``torch.func`` fallback, statistics and the Hutchinson estimator.

The public names of ``lightning_probes.core.kernels`` are re-exported here.
"""

from lightning_probes.core.kernels.tangent import (
    KernelMethod,
    Layers,
    forward_backward_kernels,
    layer_tangent_kernels,
    resolve_layers,
    tangent_kernel_factors,
)

__all__ = [
    "KernelMethod",
    "Layers",
    "forward_backward_kernels",
    "layer_tangent_kernels",
    "resolve_layers",
    "tangent_kernel_factors",
]
