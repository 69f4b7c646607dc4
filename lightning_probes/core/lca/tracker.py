r"""LCA over many steps: the cumulative allocation and one history row per allocated step.

Lan et al. (NeurIPS 2019) sum each parameter's :math:`LC_{i,t}` over training steps (which
layers helped in the end, Fig. 1) and rebuild the loss curve as :math:`L_0 + \sum_t \sum_i
LC_{i,t}` (Fig. 4). :class:`LCATracker` accumulates both from the
:class:`~lightning_probes.core.lca.allocation.LCAResult` of each step, for a plain training loop
as for :class:`~lightning_probes.callbacks.lca.LossContributionCallback`. Also here: which
buffers the LCA loss depends on (:func:`loss_buffers`) and the authors' BatchNorm mode
(:func:`use_batch_statistics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.lca.allocation import LCAResult
from lightning_probes.functional.lca import fraction_helped


class NonFiniteLossError(ArithmeticError):
    """The loss of an allocated step is NaN or infinite (nothing was recorded)."""


HISTORY_COLUMNS = ("step", "loss_before", "loss_after", "lc", "error", "splits", "helped")
"""Columns of :attr:`LCATracker.history`."""


class LCATracker:
    r"""Cumulative LC per parameter and a per-step history of allocations.

    Attributes:
        cumulative: ``{parameter name: Σ over recorded steps of LC}`` (float32 or wider).
        skipped: Steps in which no parameter moved (nothing allocated).
        grad_evals: Gradient evaluations of all recorded allocations.

    Example:
        >>> from lightning_probes.core.lca import loss_change_allocation
        >>> x0, x1 = {"x": torch.tensor([1.0, 1.0])}, {"x": torch.tensor([0.0, 2.0])}
        >>> res = loss_change_allocation(lambda p: p["x"].square().sum(), x0, x1)
        >>> tracker = LCATracker()
        >>> tracker.record(1, res, x1)
        >>> tracker.cumulative["x"].tolist(), tracker.history.shape
        ([-1.0, 3.0], torch.Size([1, 7]))
    """

    def __init__(self) -> None:
        self.cumulative: dict[str, Tensor] = {}
        self.skipped = 0
        self.grad_evals = 0
        self._rows: list[tuple[float, ...]] = []

    @property
    def history(self) -> Tensor:
        """``[m, 7]`` rows ``(step, L(θ_t), L(θ_{t+1}), Σ LC, error, splits, fraction helped)``.

        One row per recorded step (float64).
        """
        return torch.tensor(self._rows, dtype=torch.float64).reshape(-1, len(HISTORY_COLUMNS))

    @property
    def last_fraction_helped(self) -> float:
        """Fraction of parameters that helped in the last recorded step."""
        return self._rows[-1][6]

    def record(self, step: int, result: LCAResult, params: Mapping[str, Tensor]) -> None:
        r"""Add one step's allocation: ``cumulative += lc`` and a history row.

        Args:
            step: The step's number (the history's first column).
            result: Its allocation; one with ``splits == 0`` (nothing moved) only counts as
                skipped.
            params: Every parameter (frozen ones too) by name: each gets a cumulative entry,
                zeros for those not allocated.

        Raises:
            NonFiniteLossError: If the step's losses or total LC are not finite (its gradient
                evaluations are counted, nothing else).
        """
        self.grad_evals += result.grad_evals
        if result.splits == 0:
            self.skipped += 1
            return
        values = [result.total, result.loss_before, result.loss_after]
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(f"the loss on the LCA set is not finite ({values})")
        for name, p in params.items():
            if name not in self.cumulative:
                self.cumulative[name] = torch.zeros_like(p, dtype=torch.float32)
        for name, value in result.lc.items():
            cum = self.cumulative[name]
            self.cumulative[name] = cum.to(
                value.device, torch.promote_types(cum.dtype, value.dtype)
            )
            self.cumulative[name].add_(value)
        self._rows.append(
            (
                step,
                result.loss_before,
                result.loss_after,
                result.total,
                result.error,
                result.splits,
                fraction_helped(result.lc.values()),
            )
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (loads with ``weights_only=True``)."""
        return {
            "cumulative": {k: v.detach().cpu().clone() for k, v in self.cumulative.items()},
            "history": self.history,
            "skipped": self.skipped,
            "grad_evals": self.grad_evals,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing entries: empty)."""
        self.cumulative = {k: v.clone() for k, v in state.get("cumulative", {}).items()}
        history = state.get("history")
        self._rows = [] if history is None else [tuple(r) for r in history.tolist()]
        self.skipped = int(state.get("skipped", 0))
        self.grad_evals = int(state.get("grad_evals", 0))


def use_batch_statistics(model: nn.Module) -> None:
    """Put every BatchNorm of ``model`` in train mode (the authors' LCA: batch statistics).

    Restore the modes (and running statistics) afterwards, e.g. with
    :func:`~lightning_probes.core.isolation.isolated`.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


def loss_buffers(model: nn.Module, *, batch_statistics: bool) -> dict[str, Tensor]:
    """Buffers the LCA loss depends on (a kept gradient is valid while they are unchanged).

    With ``batch_statistics`` (:func:`use_batch_statistics`) the BatchNorm running statistics
    do not enter the loss and are left out.
    """
    skip: set[str] = set()
    if batch_statistics:
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                skip.update(f"{name}.{b}" if name else b for b, _ in m.named_buffers(recurse=False))
    return {k: b for k, b in model.named_buffers() if k not in skip}
