r"""The losses and gradients :func:`~lightning_probes.core.lca.loss_change_allocation` integrates.

A ``loss_and_grad`` maps parameters to ``(loss, {name: dL/dparam})``; with an ``accumulate``
method it adds a weighted gradient into given buffers in place instead, which lets the
allocation hold no gradient copy besides its accumulator. :class:`ModelLossAndGrad` does this
for a model on a probe set (chunked, through :func:`torch.func.functional_call`; the model is
not modified), :class:`AutogradLossAndGrad` for any ``params -> scalar loss`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import (
    LossFn,
    OutputFn,
    collect_grads,
    probe_loss_and_grad,
    seed_grads,
)

ParamLossFn = Callable[[dict[str, Tensor]], Tensor]
"""``{name: tensor} -> scalar loss`` (differentiable w.r.t. the given tensors)."""
LossAndGradFn = Callable[[dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]
"""``{name: tensor} -> (loss, {name: dloss/dtensor})``, both detached."""


def model_loss_and_grad(
    model: nn.Module,
    data: ProbeSet,
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
) -> ModelLossAndGrad:
    """A ``loss_and_grad`` for :func:`loss_change_allocation`: full probe set, in chunks.

    The returned callable evaluates ``model`` at the given parameters through
    :func:`torch.func.functional_call` (parameters not given are the model's own) with
    :func:`~lightning_probes.core.evaluation.probe_loss_and_grad`; the model is not modified.
    Its :meth:`~ModelLossAndGrad.accumulate` adds a weighted gradient into given buffers in
    place, which :func:`loss_change_allocation` uses to hold no gradient copy of its own.
    Put the model in the mode you want first (the authors: dropout off, BatchNorm on batch
    statistics).

    Example:
        >>> from lightning_probes.core.lca import loss_change_allocation
        >>> net = nn.Linear(3, 2)
        >>> data = ProbeSet(torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> before = {k: v.detach().clone() for k, v in net.named_parameters()}
        >>> after = {k: v - 0.1 for k, v in before.items()}
        >>> res = loss_change_allocation(
        ...     None, before, after, loss_and_grad=model_loss_and_grad(net, data)
        ... )
        >>> res.error <= 1e-3
        True
    """
    return ModelLossAndGrad(
        model, data, loss_fn=loss_fn, output_fn=output_fn, chunk_size=chunk_size
    )


class ModelLossAndGrad:
    r"""Full-probe-set loss of a model and its gradient at given parameters, in chunks.

    Calling it gives ``(loss, {name: dL/dparam})`` like
    :func:`~lightning_probes.core.evaluation.probe_loss_and_grad`;
    :meth:`accumulate` adds :math:`w \nabla L` into existing buffers instead (no gradient
    copy). Made by :func:`model_loss_and_grad`.
    """

    def __init__(
        self,
        model: nn.Module,
        data: ProbeSet,
        *,
        loss_fn: LossFn | None = None,
        output_fn: OutputFn | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.model = model
        self.data = data
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.chunk_size = chunk_size

    def __call__(self, params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, grads)`` at ``params`` (a fresh gradient copy)."""
        return self._evaluate(params)

    def accumulate(
        self, params: dict[str, Tensor], out: dict[str, Tensor], weight: float
    ) -> Tensor:
        r"""``out[k] += weight * dL/dparams[k]`` in place, chunk by chunk; returns the loss.

        The loss is the same as :meth:`__call__`'s. Autograd accumulates each chunk's gradient
        of :math:`w L_B` straight into ``out`` (set as the private leaves' ``.grad``); with
        ``weight`` a power of two (Simpson's 1, 2, 4) the scaling is exact.
        """
        return self._evaluate(params, out=out, weight=weight)[0]

    def _evaluate(
        self, params: dict[str, Tensor], **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return probe_loss_and_grad(
            self.model,
            self.data,
            params,
            loss_fn=self.loss_fn,
            output_fn=self.output_fn,
            chunk_size=self.chunk_size,
            **kwargs,
        )


class AutogradLossAndGrad:
    """``loss_and_grad`` (and ``accumulate``) by autograd on a ``params -> loss`` callable.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
    """

    def __init__(self, loss_fn: ParamLossFn | None) -> None:
        if loss_fn is None or not callable(loss_fn):
            raise TypeError(
                "Expected `loss_fn` to be a callable params -> scalar loss (or `loss_and_grad=` "
                f"to be given), got {type(loss_fn).__name__}."
            )
        self.loss_fn = loss_fn

    def __call__(self, params: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss, grads)`` at ``params`` (zeros for parameters the loss does not use)."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = scalar_loss(self.loss_fn(leaves))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return loss.detach(), {
            k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)
        }

    def accumulate(
        self, params: dict[str, Tensor], out: dict[str, Tensor], weight: float
    ) -> Tensor:
        """``out[k] += weight * dL/dparams[k]`` in place; returns the loss."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        seeded = seed_grads(leaves, out)
        with torch.enable_grad():
            loss = scalar_loss(self.loss_fn(leaves))
            if loss.requires_grad:
                (loss if weight == 1.0 else loss * weight).backward(inputs=list(leaves.values()))
        collect_grads(leaves, out, seeded)
        return loss.detach()


def accumulate_grad(
    grad_fn: LossAndGradFn, params: dict[str, Tensor], out: dict[str, Tensor], weight: float
) -> Tensor | float:
    """``out += weight * grad`` at ``params``; returns the loss.

    In place when ``grad_fn`` has an ``accumulate`` method (:class:`ModelLossAndGrad`, the
    autograd path); otherwise through one fresh gradient copy.
    """
    accumulate = getattr(grad_fn, "accumulate", None)
    if accumulate is not None:
        return accumulate(params, out, weight)  # type: ignore[no-any-return]
    loss, grads = grad_fn(params)
    for k, buf in out.items():
        buf.add_(grads[k], alpha=weight)
    return loss


def loss_only(
    loss_fn: ParamLossFn | None, grad_fn: LossAndGradFn, params: Mapping[str, Tensor]
) -> Tensor:
    """The loss at ``params`` without its gradient (through ``grad_fn`` if ``loss_fn`` is None)."""
    if loss_fn is None:  # only a loss_and_grad was given: pay for the gradient
        return grad_fn(dict(params))[0]
    with torch.no_grad():
        return scalar_loss(loss_fn(dict(params))).detach()


def scalar_loss(loss: Any) -> Tensor:
    """``loss`` as a 0-d tensor.

    Raises:
        ValueError: If ``loss`` is not a tensor with one element.
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "Expected `loss_fn` to return a scalar tensor, got "
            f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}."
        )
    return loss.reshape(())
