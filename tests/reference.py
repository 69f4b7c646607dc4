"""Independent float64 references shared by several test modules (loops, ``torch.func``)."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, vmap


def reference_kernels(model, x, names, output_fn=None, *, recurse=False):
    """Naive reference: per-sample Jacobians of the logits with vmap(jacrev), then J J^T.

    The Jacobian is w.r.t. each named module's own parameters, or with ``recurse=True`` all of
    its parameters, its children's included (``nn.MultiheadAttention`` with ``out_proj``).

    ``x`` is a batch-first tensor (``model(x)``) or a dict of them (``model(**x)``, one
    ``jacrev`` per sample in a loop: HF masks take data-dependent branches that vmap refuses);
    ``output_fn`` maps the model's output on one sample (batch of 1) to its logits ``[1, o]``.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        mine = modules[name].named_parameters(recurse=recurse)
        own = {f"{name}.{k}": v.detach() for k, v in mine}

        def f(p, xi):
            if isinstance(xi, dict):
                y = functional_call(model, {**params, **p}, (), {k: v[None] for k, v in xi.items()})
            else:
                y = functional_call(model, {**params, **p}, (xi.unsqueeze(0),))
            return (y if output_fn is None else output_fn(y))[0]

        if isinstance(x, dict):
            n = next(iter(x.values())).shape[0]
            per = [jacrev(f)(own, {k: v[i] for k, v in x.items()}) for i in range(n)]
            jac = {k: torch.stack([j[k] for j in per]) for k in own}
        else:
            n = x.shape[0]
            jac = vmap(jacrev(f), in_dims=(None, 0))(own, x)
        o = next(iter(jac.values())).shape[1]
        J = torch.cat([j.reshape(n, o, -1) for j in jac.values()], -1).reshape(n * o, -1)
        out[name] = J @ J.T
    return out
