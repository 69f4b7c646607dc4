"""Fit-start checks that a probe understands the model's loss: shapes and determinism.

"Correct or refused" (DESIGN.md): a probe that evaluates the probe-set loss (LCA, the landscape
probe) first evaluates it on two samples through its real code path. A shape mismatch between
logits and targets is refused there with the argument to pass (``loss_fn=``, ``output_fn=``)
instead of failing, or being skipped, at every later run; a loss that changes between two
evaluations at the same weights (a random op active in ``eval()``, e.g.
``F.dropout(h, p, training=True)``) is refused because LCA's path integral and a landscape
plane compare losses at different weights, and noise of that size is not the landscape.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_probes.core.data import ProbeSet, slice_rows
from lightning_probes.core.evaluation import LossFn, OutputFn, probe_loss
from lightning_probes.core.isolation import isolated

_LM_HINT = (
    "For a language model (logits [n, L, V], targets [n, L]) the default loss is the "
    "token-level cross-entropy; for a model returning a dict or a HF ModelOutput pass "
    "`output_fn=lambda out: out.logits`; for any other pairing pass "
    "`loss_fn=lambda logits, targets: ...` returning the mean loss."
)


def check_probe_loss(
    model: nn.Module,
    data: ProbeSet,
    probe: str,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    *,
    num_samples: int = 2,
    rtol: float = 1e-5,
) -> None:
    """Evaluate the probe-set loss on ``num_samples`` samples twice; refuse what is not usable.

    Runs inside :func:`~lightning_probes.core.isolation.isolated` (eval mode, no gradients,
    RNG state restored), so training is unchanged.

    Args:
        model: The observed network.
        data: The probe set (with targets).
        probe: The probe's name, for messages.
        loss_fn: As passed to the probe (``None``: the default loss).
        output_fn: As passed to the probe.
        num_samples: Samples to evaluate on.
        rtol: Largest relative difference of two evaluations taken as equal (reduction order
            on accelerators; a random op changes the loss far more).

    Raises:
        ValueError: If the loss cannot be evaluated (naming ``loss_fn=`` / ``output_fn=``),
            is not a finite scalar, or differs between two evaluations.
    """
    if data.targets is None:
        raise ValueError(
            f"{probe}: expected a probe set with targets to evaluate the loss, got none. Pass "
            "`probe_data=(inputs, targets)` or `batch_to_inputs_targets=`."
        )
    k = min(num_samples, len(data))
    two = ProbeSet(slice_rows(data.inputs, 0, k), data.targets[:k])
    with isolated(model, grad=False):
        try:
            first = probe_loss(model, two, loss_fn=loss_fn, output_fn=output_fn)
            second = probe_loss(model, two, loss_fn=loss_fn, output_fn=output_fn)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"{probe}: the probe-set loss could not be evaluated on {k} samples "
                f"({type(err).__name__}: {err}). {_LM_HINT}"
            ) from err
    if not isinstance(first, torch.Tensor) or first.numel() != 1:
        raise ValueError(
            f"{probe}: expected the loss to be a scalar tensor, got "
            f"{getattr(first, 'shape', type(first).__name__)}. {_LM_HINT}"
        )
    a, b = float(first), float(second)
    if a != b and abs(a - b) > rtol * max(abs(a), abs(b)):
        raise ValueError(
            f"{probe}: the probe-set loss differs between two evaluations at the same weights "
            f"({a:.6g} vs {b:.6g}), in eval mode. A random op is active outside training (e.g. "
            "`F.dropout(h, p, training=True)` instead of `self.training`, or sampling in "
            "forward); the probe's losses at different weights would compare noise. Make the "
            "forward deterministic in eval mode."
        )
