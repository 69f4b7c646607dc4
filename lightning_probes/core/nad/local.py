r"""NADs, secant method: a ``conv -> act -> max_pool`` start evaluated only where it changes.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. Each secant input :math:`x_0 \pm h e_i` differs from :math:`x_0` in one
entry, which a convolution sees in at most ``kh * kw`` output positions and a max pooling in a
few windows. For a network that starts ``conv -> act* -> max_pool2d -> act*`` (traced with
:mod:`torch.fx`), :class:`LocalPrefix` recomputes only those windows — base convolution plus
:math:`\pm h` times the kernel entries (:class:`~lightning_probes.core.nad.first_layer.
FirstLayer`'s index structure), the same activations, a max — and writes them into the base
point's pooled map; a following ``conv2 -> act* -> max_pool2d -> act*`` likewise
(:mod:`lightning_probes.core.nad.second_stage`). The rest of the traced graph (``tail``) runs
on the result. Exact up to the rounding of a different summation order.

Used only where checked (:func:`find_local_prefix`): the input is used by one
exactly-``nn.Conv2d`` module only, each node of the chain is the only user of the previous
one, and the tail on the shortcut's outputs, with a NaN network input, equals the plain
forward on a few secant inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_probes.core.modules import ops_for
from lightning_probes.core.nad.first_layer import (
    FirstLayer,
    outputs_match,
    secant_inputs,
    supported,
)
from lightning_probes.core.nad.second_stage import SecondStage, int_pair, max_over

_ELEMENTWISE: dict[Any, Callable[[Tensor], Tensor]] = {
    F.relu: torch.relu,
    torch.relu: torch.relu,
    torch.tanh: torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    F.tanh: torch.tanh,
}
_ELEMENTWISE_METHODS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class LocalPrefix:
    r"""A convolution, elementwise activations and one max pooling, evaluated locally.

    For the chain ``conv -> act* -> max_pool2d -> act*`` (``act``: ``relu``, ``tanh``,
    ``sigmoid`` or ``nn.Identity``) at the start of a network (found by
    :func:`torch.fx.symbolic_trace`), the input :math:`x_0 \pm h e_i` changes the
    convolution's output only at the positions whose receptive field holds pixel :math:`i`,
    hence the pooled map only in the windows that meet them (at most a few). The chain's
    output is the one at :math:`x_0` with those pooled values replaced; each is computed from
    the base convolution plus :math:`\pm h` times the kernel entries, through the same
    activations and a max over its window: the same operations on the same values as the
    network's (up to the convolution's summation order). The rest of the network (``tail``:
    the traced graph with the chain's output as an input)
    runs on it.
    """

    def __init__(
        self,
        layer: FirstLayer,
        before: list[Callable[[Tensor], Tensor]],
        pool: tuple[tuple[int, int], tuple[int, int]],
        after: list[Callable[[Tensor], Tensor]],
        tail: nn.Module,
    ) -> None:
        self.layer, self.before, self.after, self.tail = layer, before, after, tail
        (kh, kw), (sh, sw) = pool
        self.pool = pool
        c, h, w = layer.out_shape
        hp, wp = (h - kh) // sh + 1, (w - kw) // sw + 1
        self.out_shape = (c, hp, wp)
        d = len(layer.starts) - 1
        positions = h * w
        # conv positions of each pooled window: (Lp, T)
        a = (
            torch.arange(hp, device="cpu")[:, None, None, None] * sh
            + torch.arange(kh, device="cpu")[None, None, :, None]
        )
        b = (
            torch.arange(wp, device="cpu")[None, :, None, None] * sw
            + torch.arange(kw, device="cpu")[None, None, None, :]
        )
        windows = (a * w + b).reshape(hp * wp, kh * kw)
        pix, ll = layer.pix.cpu(), layer.ll.cpu()
        # (pixel, window) pairs: window (a, c) holds conv row r iff a sh <= r < a sh + kh
        r, col = ll // w, ll % w
        found_rows: list[Tensor] = []
        found_cols: list[Tensor] = []
        for u in range(-(-kh // sh)):
            for v in range(-(-kw // sw)):
                wr = torch.div(r, sh, rounding_mode="floor") - u
                wc = torch.div(col, sw, rounding_mode="floor") - v
                ok = (wr >= 0) & (wr < hp) & (wr * sh + kh > r) & (wc >= 0) & (wc < wp)
                ok &= wc * sw + kw > col
                found_rows.append(pix[ok])
                found_cols.append((wr * wp + wc)[ok])
        key = torch.unique(torch.cat(found_rows) * (hp * wp) + torch.cat(found_cols))  # sorted
        rows, cols = key // (hp * wp), key % (hp * wp)
        counts = torch.bincount(rows, minlength=d)
        slots = max(1, int(counts.max()))
        # the j-th affected window of each pixel; pad with its first (same value written
        # twice), or window 0 without change when a pixel changes nothing
        first = torch.cumsum(counts, 0) - counts
        q = torch.zeros(d, slots, dtype=torch.long, device="cpu")
        q[rows, torch.arange(rows.numel(), device="cpu") - first[rows]] = cols
        pad = torch.arange(slots, device="cpu")[None, :] >= counts[:, None]
        q = torch.where(pad, q[:, :1], q)
        self.qidx = q
        lpos = windows[q]  # (d, Q, T)
        # kernel entry of pixel i at conv position l (K: none) by a sorted-key lookup
        k_cols = math.prod(layer.module.weight.shape[1:])  # type: ignore[union-attr,index]
        keys = pix * positions + ll
        order = torch.argsort(keys)
        keys, kk = keys[order], layer.kk.cpu()[order]
        query = torch.arange(d, device="cpu")[:, None, None] * positions + lpos
        at = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        kidx = torch.where(keys[at] == query, kk[at], torch.full_like(at, k_cols))
        # (T, d, Q): window entry t outermost, so the max over t runs on contiguous slices
        self.lpos_t = lpos.permute(2, 0, 1).contiguous()
        self.kidx_t = kidx.permute(2, 0, 1).contiguous()
        self.stage2: SecondStage | None = None

    def to(self, device: torch.device) -> LocalPrefix:
        """Move the index tensors to ``device``."""
        for attr in ("qidx", "lpos_t", "kidx_t"):
            setattr(self, attr, getattr(self, attr).to(device))
        if self.stage2 is not None:
            self.stage2.to(device)
        return self

    def _chain_at(self, conv_out: Tensor) -> Tensor:
        for fn in self.before:
            conv_out = fn(conv_out)
        (kh, kw), (sh, sw) = self.pool
        out = F.max_pool2d(conv_out, (kh, kw), (sh, sw))
        for fn in self.after:
            out = fn(out)
        return out

    def outputs(
        self, params: dict[str, Tensor], x0: Tensor, i0: int, i1: int, step: float
    ) -> Tensor:
        r"""The chain's outputs for :math:`x_0 + h e_i`, then :math:`x_0 - h e_i` (a block).

        Args:
            params: The network's parameters (``functional_call`` names).
            x0: ``(*input_shape)`` evaluation point.
            i0: First basis vector of the block.
            i1: End of the block.
            step: :math:`h`.

        Returns:
            ``(2 (i1 - i0), *out_shape)``.
        """
        weight = params[self.layer.name + ".weight"]
        bias = params.get(self.layer.name + ".bias")
        base = self.layer.ops.apply(self.layer.module, x0[None], weight, bias)
        c = weight.shape[0]
        b = i1 - i0
        flat_w = torch.cat([weight.reshape(c, -1), weight.new_zeros(c, 1)], dim=1)
        # (C, T, b, Q): window entry t of the Q changed windows of each pixel
        around = base.reshape(c, -1)[:, self.lpos_t[:, i0:i1]]
        delta = flat_w[:, self.kidx_t[:, i0:i1]].mul_(step)
        pre = torch.cat([around + delta, around.sub_(delta)], dim=2)  # (C, T, 2b, Q)
        for fn in self.before:
            pre = fn(pre)
        vals = max_over(pre, 1)  # (C, 2b, Q)
        for fn in self.after:
            vals = fn(vals)
        if self.stage2 is not None:
            p0 = self._chain_at(base)[0]
            return self.stage2.outputs(params, p0, vals, self.qidx[i0:i1], i0, i1)
        out_base = self._chain_at(base).reshape(1, c, -1)
        out = out_base.expand(2 * b, -1, -1).contiguous()
        q = self.qidx[i0:i1].repeat(2, 1)  # (2b, Q)
        rows = torch.arange(2 * b, device=q.device)[:, None].expand_as(q)
        out.transpose(1, 2)[rows, q] = vals.permute(1, 2, 0)  # adjacent indices: vmap-safe
        return out.reshape(2 * b, *self.out_shape)


def find_local_prefix(model: nn.Module, x0: Tensor, step: float) -> LocalPrefix | None:
    """The network's ``conv -> activations -> max_pool2d`` start as a :class:`LocalPrefix`.

    Traces ``model`` with :func:`torch.fx.symbolic_trace`; requires the input to be used by
    one exactly-``nn.Conv2d`` module only, followed by a chain (each node the only user of the
    previous one) of elementwise ``relu``/``tanh``/``sigmoid`` and one ``max_pool2d`` without
    padding, dilation or ``ceil_mode``; then checks the tail on a few secant inputs against
    the plain forward (with a NaN input, so the input cannot reach the output another way).

    Args:
        model: The template network (``eval()``), on ``x0``'s device and dtype.
        x0: ``(*input_shape)`` evaluation point.
        step: :math:`h`.

    Returns:
        The :class:`LocalPrefix`, or ``None``.
    """
    shape = tuple(x0.shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or len(inputs[0].users) != 1:
        return None
    conv = next(iter(inputs[0].users))
    if conv.op != "call_module" or conv.args != (inputs[0],) or conv.kwargs:
        return None
    module = gm.get_submodule(str(conv.target))
    if not supported(module, shape) or not _is_conv2d(module):
        return None
    if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == conv.target) != 1:
        return None
    found = _act_pool_chain(gm, conv)
    if found is None:
        return None
    before, pool, after, chain = found
    node = chain[-1]
    second = _second_conv(gm, graph, node)
    stage2 = None
    if second is not None and (found2 := _act_pool_chain(gm, second)) is not None:
        before2, pool2, after2, chain2 = found2
        if pool2[0] == pool2[1]:  # kernel = stride
            stage2 = (second, before2, pool2, after2)
            chain, node = chain + chain2, chain2[-1]
    try:
        layer = FirstLayer(str(conv.target), module, shape)
        prefix = LocalPrefix(layer, before, pool, after, gm)
        if stage2 is not None:
            conv2, before2, pool2, after2 = stage2
            prefix.stage2 = SecondStage(
                str(conv2.target),
                gm.get_submodule(str(conv2.target)),  # type: ignore[arg-type]
                before2,
                pool2,
                after2,
                prefix.out_shape,
                prefix.qidx,
            )
        with graph.inserting_after(inputs[0]):
            injected = graph.placeholder("nad_first_outputs")
        node.replace_all_uses_with(injected)
        for n in reversed(chain):
            graph.erase_node(n)
        graph.lint()
        gm.recompile()
        prefix.to(x0.device)
    except Exception:
        return None
    return prefix if _tail_matches(model, prefix, x0, step) else None


def _act_pool_chain(gm: nn.Module, conv: Any) -> tuple[Any, Any, Any, list[Any]] | None:
    """From a conv node: ``act* -> max_pool2d -> act*``, each node the previous one's only user."""
    before: list[Callable[[Tensor], Tensor]] = []
    after: list[Callable[[Tensor], Tensor]] = []
    pool: tuple[tuple[int, int], tuple[int, int]] | None = None
    chain, node = [conv], conv
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not user.args or user.args[0] is not node:
            break
        fn = _elementwise(gm, user)
        if fn is not None:
            (after if pool is not None else before).append(fn)
        elif pool is None and (found := _max_pool(gm, user)) is not None:
            pool = found
        else:
            break
        chain.append(user)
        node = user
    return None if pool is None else (before, pool, after, chain)


def _second_conv(gm: nn.Module, graph: Any, node: Any) -> Any:
    """The node's only user if it is a stride-1, undilated, ungrouped ``nn.Conv2d`` called once."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op != "call_module" or user.args != (node,) or user.kwargs:
        return None
    m = gm.get_submodule(str(user.target))
    if not _is_conv2d(m) or m.groups != 1 or m.padding_mode != "zeros":
        return None
    if isinstance(m.padding, str) or m.stride != (1, 1) or m.dilation != (1, 1):
        return None
    if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == user.target) != 1:
        return None
    return user


def _tail_matches(model: nn.Module, prefix: LocalPrefix, x0: Tensor, step: float) -> bool:
    """The tail on the prefix's outputs equals the plain forward on a few secant inputs."""
    d = x0.numel()
    idx = sorted({0, d // 3, d // 2, d - 1})
    inputs, nan_input = secant_inputs(x0, idx, step)
    params = {n: p.detach() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            expected = model(inputs)
            first = [prefix.outputs(params, x0, i, i + 1, step) for i in idx]
            h = torch.cat([f[:1] for f in first] + [f[1:] for f in first])
            got = prefix.tail(nan_input, h)
    except Exception:
        return False
    return outputs_match(got, expected, x0.dtype)


def _elementwise(gm: nn.Module, node: Any) -> Callable[[Tensor], Tensor] | None:
    extra_args = len(node.args) > 1 or any(k != "inplace" for k in node.kwargs)
    if extra_args:
        return None
    if node.op == "call_function":
        return _ELEMENTWISE.get(node.target)
    if node.op == "call_method":
        return _ELEMENTWISE_METHODS.get(str(node.target))
    if node.op == "call_module":
        ops = ops_for(gm.get_submodule(str(node.target)), exact=True)
        return None if ops is None else ops.pointwise
    return None


def _is_conv2d(module: nn.Module) -> bool:
    """A layer whose exact type is registered as a 2-d convolution (``nn.Conv2d``)."""
    ops = ops_for(module, exact=True)
    return ops is not None and ops.spatial_dims == 2


def _max_pool(gm: nn.Module, node: Any) -> tuple[tuple[int, int], tuple[int, int]] | None:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if type(m) is not nn.MaxPool2d or len(node.args) != 1 or node.kwargs:
            return None
        kernel, stride, padding, dilation = m.kernel_size, m.stride, m.padding, m.dilation
        ceil, indices = m.ceil_mode, m.return_indices
    elif node.op == "call_function" and node.target in (F.max_pool2d, torch.max_pool2d):

        def bind(
            input: Any,
            kernel_size: Any,
            stride: Any = None,
            padding: Any = 0,
            dilation: Any = 1,
            ceil_mode: bool = False,
            return_indices: bool = False,
        ) -> tuple[Any, ...]:
            return kernel_size, stride, padding, dilation, ceil_mode, return_indices

        try:
            kernel, stride, padding, dilation, ceil, indices = bind(*node.args, **node.kwargs)
        except TypeError:
            return None
    else:
        return None
    pair = int_pair(kernel)
    strides = pair if stride is None or stride == [] or stride == () else int_pair(stride)
    if pair is None or strides is None or ceil or indices:
        return None
    if int_pair(padding) != (0, 0) or int_pair(dilation) != (1, 1):
        return None
    return pair, strides
