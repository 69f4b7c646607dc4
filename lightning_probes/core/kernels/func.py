r"""General per-layer kernel path through :mod:`torch.func`, for any module with parameters.

For a layer :math:`z_i = g_\theta(u_i)` (LayerNorm, BatchNorm in eval, Embedding, a custom
module) with recorded inputs :math:`u_i` and output gradients
:math:`\delta^c_i = \partial f_c(x_i) / \partial z_i`, the per-sample Jacobian rows are
vector-Jacobian products of the module alone,

.. math:: J_{(i,c)} = \Big(\frac{\partial g_\theta(u_i)}{\partial \theta}\Big)^T \delta^c_i,

computed with ``vmap`` over samples (``chunk_size`` at a time) and outputs, around
``functional_call`` + ``vjp``. Only the module is differentiated, never the whole network again.
The layer's parameters and how it is called functionally come from its registry entry
(:meth:`~lightning_probes.core.modules.LayerOps.layer_parameters`,
:meth:`~lightning_probes.core.modules.LayerOps.functional_forward`): by default the parameters
it owns directly and its output; for ``nn.MultiheadAttention`` every parameter of the block
and the attention output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from lightning_probes.core.kernels.capture import LayerRecord
from lightning_probes.core.kernels.factors import JacobianFactors
from lightning_probes.core.modules import LayerOps, ops_for


def func_factors(module: nn.Module, record: LayerRecord, chunk_size: int | None) -> JacobianFactors:
    """Per-sample Jacobian rows of the layer's parameters, on demand per sample range.

    Args:
        module: The layer (its parameters: its registry entry's ``layer_parameters``).
        record: Its recorded inputs, samples first, and output gradients ``[o, n, *out]``.
        chunk_size: Samples per ``vmap`` call (``None``: all).

    Returns:
        :class:`~lightning_probes.core.kernels.factors.JacobianFactors`.
    """
    ops = ops_for(module) or LayerOps()
    params = {k: p.detach() for k, p in ops.layer_parameters(module).items()}
    names = list(params)
    grads = record.grads
    o, n = grads.shape[:2]
    batched = [isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == n for a in record.args]
    kwargs = record.kwargs

    def per_sample(p: dict[str, Tensor], sample: tuple[Tensor, ...], delta: Tensor) -> Tensor:
        it = iter(sample)
        args = tuple(next(it).unsqueeze(0) if b else a for a, b in zip(record.args, batched))

        def g(pp: dict[str, Tensor]) -> Tensor:
            return ops.functional_forward(module, pp, args, kwargs)

        _, pullback = vjp(g, p)  # type: ignore[misc]
        rows = vmap(pullback)(delta.unsqueeze(1))[0]  # {name: [o, *param_shape]}
        return torch.cat([rows[k].reshape(o, -1) for k in names], 1)

    def rows_fn(span: slice) -> Tensor:
        sample = tuple(a[span] for a, b in zip(record.args, batched) if b)
        delta = grads[:, span].to(next(iter(params.values())).dtype)
        jac = vmap(per_sample, in_dims=(None, 0, 1), chunk_size=chunk_size)(params, sample, delta)
        return jac.reshape(-1, jac.shape[-1]).to(grads.dtype)

    return JacobianFactors(rows_fn, n, o, grads.dtype)
