r"""Loss Change Allocation of one training step, at any parameters, by path integration.

Lan et al., "LCA: Loss Change Allocation for Neural Network Training", NeurIPS 2019. For a
step :math:`\theta_t \to \theta_{t+1}` with :math:`\Delta = \theta_{t+1} - \theta_t`,

.. math::
    LC_i = \Delta_i \int_0^1 \partial_i L(\theta_t + s\Delta)\, ds
    \approx \Delta_i \sum_{j=0}^{N} w_j\, \partial_i L(\theta_t + \tfrac{j}{N}\Delta),
    \qquad \sum_i LC_i \approx L(\theta_{t+1}) - L(\theta_t),

with composite Simpson weights :math:`w` on ``N`` splits
(:func:`~lightning_probes.functional.lca.simpson_weights`). Following the authors' code, the
``adaptive`` method starts at 2 splits and doubles them while
:math:`|L(\theta_{t+1}) - L(\theta_t) - \sum_i LC_i| >` ``tolerance`` (absolute, 1e-3) and
``N < 32``, reusing every gradient already computed: the old points are the even points of
the doubled grid. ``first_order`` uses the gradient at :math:`\theta_t` only (the paper's
illustration; on a convex loss it overestimates the decrease).

Memory, in parameter-sized buffers (the inputs ``before``/``after`` not counted): the
weighted gradients are summed in "gradient space", :math:`\sum_j c_j g_j` with Simpson's
integer weights :math:`c_j \in \{1, 2, 4\}`, in one accumulator that is the buffer of
:math:`g(\theta_t)` (``start``, reused in place); autograd adds each new gradient straight
into it (``loss_and_grad.accumulate``: the scaled loss :math:`c_j L` is differentiated, exact
for powers of two), so no gradient copy exists besides it; one evaluation point is rebuilt in
place; :math:`\Delta` is formed block by block when the accumulator becomes
:math:`LC = \Delta \odot \sum_j c_j g_j / 3N`. ``simpson``: accumulator + point, then
accumulator + the kept gradient at :math:`\theta_{t+1}` = **2**; ``adaptive`` needs a second
accumulator for the odd points (**3**, and 4 while it refines with the kept end gradient);
``first_order``: **2**. A ``loss_and_grad`` without ``accumulate`` costs one gradient copy more.
No Lightning import; weights are never modified (evaluation through the caller's
``loss_fn`` / ``loss_and_grad``, e.g. :func:`torch.func.functional_call`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_probes.core.device import tensors_equal
from lightning_probes.core.lca.gradients import (
    AutogradLossAndGrad,
    LossAndGradFn,
    ParamLossFn,
    accumulate_grad,
    loss_only,
)
from lightning_probes.functional.lca import block_size, relative_error, sum64_tensor

IntegrationRule = Literal["first_order", "simpson", "adaptive"]
METHODS: tuple[str, ...] = ("first_order", "simpson", "adaptive")


@dataclass
class LCAResult:
    r"""The allocation of one step's loss change.

    Attributes:
        lc: ``{name: LC}``, each with the shape of its parameter (float32 or wider).
            Negative: the parameter helped (moved the loss down).
        total: :math:`\sum_i LC_i`, the allocated loss change.
        loss_before: :math:`L(\theta_t)`.
        loss_after: :math:`L(\theta_{t+1})`.
        true_delta: :math:`L(\theta_{t+1}) - L(\theta_t)`.
        error: :math:`|\Delta L_\text{true} - \sum_i LC_i|` (absolute).
        splits: Intervals of the quadrature used (1 for ``first_order``, 0 if nothing moved).
        grad_evals: Gradient evaluations this call made (reused ones not counted).
        grad_after: ``{name: dL/dθ}`` at :math:`\theta_{t+1}`, for reuse as the next step's
            ``start`` (``None`` when not computed).
    """

    lc: dict[str, Tensor]
    total: float
    loss_before: float
    loss_after: float
    true_delta: float
    error: float
    splits: int
    grad_evals: int
    grad_after: dict[str, Tensor] | None = None

    @property
    def relative_error(self) -> float:
        r"""The relative error :math:`|\sum_i LC_i - \Delta L| / |\Delta L|`."""
        return relative_error(self.total, self.true_delta)


def loss_change_allocation(
    loss_fn: ParamLossFn | None,
    before: Mapping[str, Tensor],
    after: Mapping[str, Tensor],
    *,
    method: IntegrationRule = "adaptive",
    splits: int = 2,
    tolerance: float = 1e-3,
    max_splits: int = 32,
    loss_and_grad: LossAndGradFn | None = None,
    start: tuple[Tensor | float, dict[str, Tensor]] | None = None,
    keep_grad_after: bool = True,
) -> LCAResult:
    r"""Allocate :math:`L(\theta_{t+1}) - L(\theta_t)` to every parameter (Lan et al., 2019).

    Args:
        loss_fn: ``params -> scalar loss`` (``params`` holds every name of ``before``). The
            full-batch loss on the LCA set; differentiated with autograd. May be ``None`` when
            ``loss_and_grad`` is given.
        before: :math:`\theta_t`, ``{name: tensor}``. bfloat16/float16 weights are evaluated
            in float32 (``loss_fn`` receives float32 tensors: the end points exactly, and the
            points between unrounded), so the allocation sums to the float32 loss change of
            those weights; gradients and LC are float32 or wider.
        after: :math:`\theta_{t+1}`, the same names and shapes.
        method: ``"first_order"`` (gradient at :math:`\theta_t`), ``"simpson"`` (``splits``
            fixed; 2 is the paper's "RK4") or ``"adaptive"`` (start at ``splits``, double until
            the error is at most ``tolerance`` or ``max_splits`` is reached).
        splits: Even number of intervals (fixed for ``simpson``, initial for ``adaptive``).
        tolerance: Absolute error bound of ``adaptive``.
        max_splits: Largest number of splits of ``adaptive``.
        loss_and_grad: ``params -> (loss, grads)``; overrides autograd on ``loss_fn`` (e.g.
            chunked full-probe-set gradients,
            :func:`~lightning_probes.core.lca.gradients.model_loss_and_grad`). If it also has a
            method ``accumulate(params, out, weight) -> loss`` that adds ``weight * grad`` into
            the tensors of ``out`` in place (as
            :class:`~lightning_probes.core.lca.gradients.ModelLossAndGrad`), no gradient copy is
            made besides the accumulator.
        start: ``(loss, grads)`` already known at ``before`` (the previous step's
            ``grad_after``); saves one gradient evaluation. Its gradient tensors are used as
            workspace and overwritten (pass copies to keep them).
        keep_grad_after: Return the gradient at ``after`` (``first_order`` then computes it
            instead of only the loss, which makes the next step's ``start`` free).

    Returns:
        An :class:`LCAResult`.

    Raises:
        ValueError: On an unknown ``method``, bad ``splits``/``tolerance``/``max_splits``,
            ``before``/``after`` that disagree, or a non-scalar loss.
        TypeError: If neither ``loss_fn`` nor ``loss_and_grad`` is given.

    Example:
        >>> a = torch.tensor([3.0, -1.0], dtype=torch.float64)
        >>> res = loss_change_allocation(
        ...     lambda p: (a * p["x"] ** 2).sum(),
        ...     {"x": torch.tensor([1.0, 1.0], dtype=torch.float64)},
        ...     {"x": torch.tensor([0.0, 2.0], dtype=torch.float64)},
        ...     method="simpson",
        ... )
        >>> res.lc["x"].round(decimals=9).tolist(), res.true_delta, res.splits
        ([-3.0, -3.0], -6.0, 2)
    """
    check_lca_arguments(method, splits, tolerance, max_splits)
    names = _check_params(before, after)
    grad_fn = loss_and_grad if loss_and_grad is not None else AutogradLossAndGrad(loss_fn)
    acc_dtype = {k: torch.promote_types(before[k].dtype, torch.float32) for k in names}
    deltas_nonzero = not tensors_equal({k: before[k] for k in names}, {k: after[k] for k in names})

    evals = 0
    loss0: Tensor | float
    if start is None:
        loss0, g0 = grad_fn(_widened(before, acc_dtype))
        evals += 1
    else:
        loss0, g0 = start
    start = None  # drop our reference: the caller may have handed over its only one
    if not deltas_nonzero:  # nothing moved (e.g. a step the AMP GradScaler skipped)
        zeros = {k: torch.zeros_like(before[k], dtype=acc_dtype[k]) for k in names}
        l0 = float(loss0)
        return LCAResult(zeros, 0.0, l0, l0, 0.0, 0.0, 0, evals, g0 if keep_grad_after else None)

    # The accumulator holds Σ_j c_j g_j (gradient space, integer Simpson weights c_j); it is
    # the buffer of g(θ_t) when that is ours or handed over (one copy less).
    acc = {k: g0[k] if g0[k].dtype == acc_dtype[k] else g0[k].to(acc_dtype[k]) for k in names}
    del g0
    point: dict[str, Tensor] = {}  # one evaluation-point buffer, rebuilt in place

    def add_grad_at(s: float, out: dict[str, Tensor], weight: float) -> None:
        nonlocal evals
        for k in names:
            # the point in float32 or wider: bf16 weights' segment is not rounded to bf16
            a, b = before[k].to(acc_dtype[k]), after[k].to(acc_dtype[k])
            if k in point:
                torch.lerp(a, b, s, out=point[k])
            else:
                point[k] = torch.lerp(a, b, s)
            del a, b
        accumulate_grad(grad_fn, point, out, weight)
        evals += 1

    def at_end(out: dict[str, Tensor]) -> tuple[Tensor | float, dict[str, Tensor] | None]:
        """``out += g(θ_{t+1})``; also returns that gradient when it is to be kept."""
        nonlocal evals
        point.clear()  # θ_{t+1} is ``after`` itself: no buffer
        evals += 1
        if not keep_grad_after:
            return accumulate_grad(grad_fn, _widened(after, acc_dtype), out, 1.0), None
        loss1, g1 = grad_fn(_widened(after, acc_dtype))
        for k in names:
            out[k].add_(g1[k])
        return loss1, g1

    loss1: Tensor | float
    g1: dict[str, Tensor] | None
    if method == "first_order":
        if keep_grad_after:
            loss1, g1 = grad_fn(_widened(after, acc_dtype))
            evals += 1
        else:
            loss1, g1 = loss_only(loss_fn, grad_fn, _widened(after, acc_dtype)), None
        _to_lc(acc, before, after, 1)
        return _result(acc, loss0, loss1, 1, evals, g1)

    if method == "simpson":
        for j in range(1, splits):
            add_grad_at(j / splits, acc, 4.0 if j % 2 else 2.0)
        loss1, g1 = at_end(acc)
        _to_lc(acc, before, after, 3 * splits)
        return _result(acc, loss0, loss1, splits, evals, g1)

    # adaptive: acc = g_0 + g_N + 2 Σ_even g_j, odd = Σ_odd g_j; LC = Δ ⊙ (acc + 4 odd) / 3N
    n = splits
    odd = {k: torch.zeros_like(v) for k, v in acc.items()}
    for j in range(1, n):
        add_grad_at(j / n, odd if j % 2 else acc, 1.0 if j % 2 else 2.0)
    loss1, g1 = at_end(acc)
    true_delta = float(loss1) - float(loss0)
    while True:
        total = (_dot_delta(acc, before, after) + 4.0 * _dot_delta(odd, before, after)) / (3 * n)
        if abs(true_delta - total) <= tolerance or 2 * n > max_splits:
            break
        for k in names:  # the old odd points become even points of the doubled grid
            acc[k].add_(odd[k], alpha=2.0)
            odd[k].zero_()
        n *= 2
        for j in range(1, n, 2):
            add_grad_at(j / n, odd, 1.0)
        point.clear()
    for k in names:
        acc[k].add_(odd[k], alpha=4.0)
    del odd
    _to_lc(acc, before, after, 3 * n)
    return _result(acc, loss0, loss1, n, evals, g1)


def _widened(params: Mapping[str, Tensor], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
    """``params`` in ``dtypes`` (float32 or wider): copies of bfloat16/float16 tensors only."""
    return {k: v if v.dtype == dtypes[k] else v.to(dtypes[k]) for k, v in params.items()}


def _result(
    lc: dict[str, Tensor],
    loss0: Tensor | float,
    loss1: Tensor | float,
    splits: int,
    evals: int,
    grad_after: dict[str, Tensor] | None,
) -> LCAResult:
    total = _sum(lc)
    true_delta = float(loss1) - float(loss0)
    return LCAResult(
        lc=lc,
        total=total,
        loss_before=float(loss0),
        loss_after=float(loss1),
        true_delta=true_delta,
        error=abs(true_delta - total),
        splits=splits,
        grad_evals=evals,
        grad_after=grad_after,
    )


def _sum(tensors: Mapping[str, Tensor]) -> float:
    """Σ of every tensor's float64 sum, in order, read back once (one host synchronisation)."""
    parts = [sum64_tensor(t) for t in tensors.values()]
    total = torch.zeros((), dtype=torch.float64, device=parts[0].device if parts else None)
    for part in parts:
        total += part.to(total.device)
    return float(total)


def _to_lc(
    acc: dict[str, Tensor], before: Mapping[str, Tensor], after: Mapping[str, Tensor], div: int
) -> None:
    r"""``acc[k] <- Δ_k ⊙ acc[k] / div`` in place, :math:`\Delta` formed block by block."""
    for k, buf in acc.items():
        for b, a, t in _blocks(buf, after[k], before[k]):
            b.mul_(a.to(b.dtype) - t.to(b.dtype))
            if div != 1:
                b.div_(div)


def _dot_delta(
    acc: Mapping[str, Tensor], before: Mapping[str, Tensor], after: Mapping[str, Tensor]
) -> float:
    r""":math:`\sum_k \Delta_k \cdot acc_k` (float64 sum), block by block."""
    total: Tensor | None = None  # read back once: one host synchronisation, not one per tensor
    for k, buf in acc.items():
        part = torch.zeros((), dtype=torch.float64, device=buf.device)
        for b, a, t in _blocks(buf, after[k], before[k]):
            part += (a.to(b.dtype) - t.to(b.dtype)).mul_(b).sum(dtype=torch.float64)
        total = part.clone() if total is None else total.add_(part.to(total.device))
    return 0.0 if total is None else float(total)


def _blocks(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Matching flat blocks (views) of same-shaped tensors: bounded temporaries per block.

    One block (the tensors themselves) when one of them is not contiguous.
    """
    if not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    size = block_size(flat[0].numel())
    return list(zip(*(f.split(size) for f in flat)))


def check_lca_arguments(method: str, splits: int, tolerance: float, max_splits: int) -> None:
    """Validate the quadrature arguments of :func:`loss_change_allocation`.

    Raises:
        ValueError: On an unknown ``method``, an odd or small ``splits``, a non-positive
            ``tolerance`` or ``max_splits < splits``.
    """
    if method not in METHODS:
        raise ValueError(f"`method` can be {', '.join(map(repr, METHODS))}, got {method!r}.")
    if not isinstance(splits, int) or isinstance(splits, bool) or splits < 2 or splits % 2:
        raise ValueError(f"Expected `splits` to be an even int >= 2, got {splits!r}.")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"Expected `tolerance` to be a positive number, got {tolerance!r}.")
    if not isinstance(max_splits, int) or isinstance(max_splits, bool) or max_splits < splits:
        raise ValueError(
            f"Expected `max_splits` to be an int >= `splits` ({splits}), got {max_splits!r}."
        )


def _check_params(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> list[str]:
    if not before:
        raise ValueError("Expected `before` to hold at least one parameter, got none.")
    if set(before) != set(after):
        missing = sorted(set(before) ^ set(after))
        raise ValueError(
            f"Expected `before` and `after` to have the same names, got differences {missing}."
        )
    for k, v in before.items():
        if v.shape != after[k].shape:
            raise ValueError(
                f"Expected `after[{k!r}]` to have shape {tuple(v.shape)} like `before`, got "
                f"{tuple(after[k].shape)}."
            )
    return list(before)
