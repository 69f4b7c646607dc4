"""Loss Change Allocation (Lan et al., NeurIPS 2019).

The public names of ``lightning_probes.core.lca`` are re-exported here.
"""

from lightning_probes.core.lca.allocation import (
    METHODS,
    IntegrationRule,
    LCAResult,
    LossAndGradFn,
    ModelLossAndGrad,
    ParamLossFn,
    loss_change_allocation,
    model_loss_and_grad,
)

__all__ = [
    "METHODS",
    "IntegrationRule",
    "LCAResult",
    "LossAndGradFn",
    "ModelLossAndGrad",
    "ParamLossFn",
    "loss_change_allocation",
    "model_loss_and_grad",
]
