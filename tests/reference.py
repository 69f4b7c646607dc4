"""Independent float64 references shared by several test modules (loops, ``torch.func``)."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev, vmap


def reference_kernels(model, x, names):
    """Naive reference: per-sample Jacobians of the logits with vmap(jacrev), then J J^T."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        own = {f"{name}.{k}": v.detach() for k, v in modules[name].named_parameters(recurse=False)}

        def f(p, xi):
            return functional_call(model, {**params, **p}, (xi.unsqueeze(0),))[0]

        jac = vmap(jacrev(f), in_dims=(None, 0))(own, x)
        n = x.shape[0]
        o = next(iter(jac.values())).shape[1]
        J = torch.cat([j.reshape(n, o, -1) for j in jac.values()], -1).reshape(n * o, -1)
        out[name] = J @ J.T
    return out
