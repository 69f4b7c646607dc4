"""Loss Change Allocation (Lan et al., NeurIPS 2019).

The public names of ``lightning_probes.core.lca`` are re-exported here.
"""

from lightning_probes.core.lca.allocation import (
    METHODS,
    IntegrationRule,
    LCAResult,
    check_lca_arguments,
    loss_change_allocation,
)
from lightning_probes.core.lca.gradients import (
    AutogradLossAndGrad,
    LossAndGradFn,
    ModelLossAndGrad,
    ParamLossFn,
    model_loss_and_grad,
)

__all__ = [
    "METHODS",
    "AutogradLossAndGrad",
    "IntegrationRule",
    "LCAResult",
    "LossAndGradFn",
    "ModelLossAndGrad",
    "ParamLossFn",
    "check_lca_arguments",
    "loss_change_allocation",
    "model_loss_and_grad",
]
