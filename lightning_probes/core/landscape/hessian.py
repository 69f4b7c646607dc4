r"""Top Hessian eigenvalues by Lanczos on Hessian-vector products: the "short directions".

Fort & Jastrzebski (NeurIPS 2019) describe the low-loss set as n-wedges: many long, flat
directions and a few short, high-curvature ones, whose number they read off the top of the
Hessian spectrum. This module estimates the top-k eigenvalues of the probe-set Hessian
without forming it: Lanczos iterations with full re-orthogonalisation, each costing one
Hessian-vector product (double backward, one chunk of the probe set at a time).

**Costly**: ``num_iters`` Hessian-vector products, each about two forward and two backward
passes over the whole probe set, plus ``num_iters`` copies of the parameter vector.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import LossFn, OutputFn, as_logits, call_model, chunks
from lightning_probes.core.evaluation import default_loss as _default_loss
from lightning_probes.functional.linalg import block_lanczos


def hessian_vector_product(
    model: nn.Module,
    data: ProbeSet,
    params: Mapping[str, Tensor],
    vector: Mapping[str, Tensor],
    *,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r""":math:`H v` with :math:`H = \nabla^2_\theta L(\theta)` of the probe-set mean loss.

    Computed by double backward, :math:`Hv = \nabla_\theta \langle \nabla_\theta L, v\rangle`,
    chunk by chunk (the Hessian of a weighted sum of chunk losses is the weighted sum of
    their Hessians), so memory is that of one chunk's second-order graph.

    Args:
        model: The network (not modified; evaluated with ``functional_call``).
        data: Probe set with targets.
        params: :math:`\theta`, ``{name: tensor}`` (the Hessian is w.r.t. these only).
        vector: :math:`v`, shaped like ``params``.
        loss_fn: ``(outputs, targets) -> mean loss``.
        output_fn: Model output to logits.
        chunk_size: Samples per forward pass.

    Returns:
        ``{name: tensor}`` shaped like ``params``, detached.
    """
    if data.targets is None:
        raise ValueError("Expected a probe set with targets to evaluate a loss, got none.")
    loss_fn = loss_fn or _default_loss
    names = list(params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    vec = [vector[k].detach() for k in names]
    out = {k: torch.zeros_like(v) for k, v in leaves.items()}
    n = len(data)
    with torch.enable_grad():
        for inputs, targets, size in chunks(data, chunk_size):
            logits = as_logits(call_model(model, leaves, inputs), output_fn)
            loss = loss_fn(logits, targets) * (size / n)  # type: ignore[arg-type]
            grads = torch.autograd.grad(loss, [leaves[k] for k in names], create_graph=True)
            dot = torch.stack([(g * v).sum() for g, v in zip(grads, vec)]).sum()
            hv = torch.autograd.grad(dot, [leaves[k] for k in names], allow_unused=True)
            for k, h in zip(names, hv):
                if h is not None:
                    out[k] += h
    return out


def lanczos_top_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    *,
    num_iters: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    r"""Largest ``k`` eigenvalues of a symmetric operator by Lanczos with full re-orthogonalisation.

    :func:`~lightning_probes.functional.linalg.block_lanczos` with a block of one vector: an
    orthonormal Krylov basis :math:`Q_m` of :math:`\{q_1, Aq_1, \dots\}` and the Ritz values
    of :math:`Q_m^\top A Q_m`, which converge to the extreme eigenvalues of :math:`A` first,
    exactly when ``m == dim``.

    Args:
        matvec: ``v [dim] -> A v [dim]`` for a symmetric ``A``.
        dim: Dimension of the space.
        k: Number of eigenvalues (``1 <= k <= dim``).
        num_iters: Lanczos steps ``m`` (default ``min(dim, max(2k + 20, 40))``).
        generator: CPU generator of the random start vector.
        dtype: Dtype of the Lanczos vectors.
        device: Device of the Lanczos vectors.

    Returns:
        ``[k]`` Ritz values in descending order (float64), fewer if the Krylov space is
        exhausted earlier (an invariant subspace was found).

    Raises:
        ValueError: If ``k`` or ``num_iters`` is out of range.
    """
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(f"Expected `k` to be an int in [1, {dim}], got {k!r}.")
    m = min(dim, max(2 * k + 20, 40)) if num_iters is None else num_iters
    if not isinstance(m, int) or not k <= m <= dim:
        raise ValueError(f"Expected `num_iters` to be an int in [k={k}, dim={dim}], got {m!r}.")
    q = torch.randn(dim, 1, generator=generator, dtype=torch.float64, device="cpu").to(
        device, dtype
    )
    ritz = block_lanczos(lambda v: matvec(v[:, 0]).to(dtype)[:, None], q, max_iter=m - 1)
    return ritz.flip(0)[:k].to(torch.float64)


def hessian_top_eigenvalues(
    model: nn.Module,
    data: ProbeSet,
    params: Mapping[str, Tensor] | None = None,
    *,
    k: int = 10,
    num_iters: int | None = None,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Top-``k`` eigenvalues of the probe-set Hessian (Lanczos on Hessian-vector products).

    **Costly**: ``num_iters`` Hessian-vector products over the whole probe set.

    Args:
        model: The network (not modified).
        data: Probe set with targets.
        params: Where to evaluate (default: the model's trainable parameters).
        k: Number of eigenvalues.
        num_iters: Lanczos steps (see :func:`lanczos_top_eigenvalues`).
        generator: Generator of the start vector.
        loss_fn: ``(outputs, targets) -> mean loss``.
        output_fn: Model output to logits.
        chunk_size: Samples per forward pass.

    Returns:
        ``[k]`` eigenvalues, descending, float64.
    """
    if params is None:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    ref = params[names[0]]

    def matvec(v: Tensor) -> Tensor:
        parts = torch.split(v.to(ref.dtype), sizes)
        vec = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
        hv = hessian_vector_product(
            model, data, params, vec, loss_fn=loss_fn, output_fn=output_fn, chunk_size=chunk_size
        )
        return torch.cat([hv[n].reshape(-1) for n in names])

    return lanczos_top_eigenvalues(
        matvec,
        sum(sizes),
        k,
        num_iters=num_iters,
        generator=generator,
        dtype=ref.dtype,
        device=ref.device,
    )


def count_short_directions(eigenvalues: Tensor, threshold: float) -> int:
    r"""Number of "short" (high-curvature) directions: eigenvalues above ``threshold``.

    .. math:: N_{\text{short}} = \#\{i : \lambda_i > \tau\}

    Counted among the eigenvalues given (with Lanczos top-k, the count saturates at k).
    """
    return int((eigenvalues > threshold).sum())
