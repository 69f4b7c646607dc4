"""Loss landscape of the n-wedge model (Fort & Jastrzebski, NeurIPS 2019).

Planes, chain
tracing, affine paths, Hessian-vector products and Lanczos.

The public names of ``lightning_probes.core.landscape`` are re-exported here.
"""

from lightning_probes.core.landscape.planes import (
    LossPlane,
    Params,
    batched_probe_loss,
    combine,
    family_loss,
    flatten,
    loss_along_path,
    loss_plane,
    orthogonalize,
    random_direction,
    trainable_parameters,
)

__all__ = [
    "LossPlane",
    "Params",
    "batched_probe_loss",
    "combine",
    "family_loss",
    "flatten",
    "loss_along_path",
    "loss_plane",
    "orthogonalize",
    "random_direction",
    "trainable_parameters",
]
