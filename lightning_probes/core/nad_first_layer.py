r"""NADs: the secant inputs' first-layer outputs built from the layer's weights, without the layer.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. The authors' central differences evaluate every network on the ``2d`` inputs
:math:`x_0 \pm h e_i`. When the network's first layer is a linear map :math:`A` with bias
:math:`b` (``nn.Linear``, or ``nn.Conv2d`` with zero padding and one group) applied to the
input itself, its outputs on those inputs are

.. math:: A(x_0 \pm h e_i) + b = (A x_0 + b) \pm h\, A e_i,

and :math:`A e_i` is column :math:`i` of :math:`A`: for a convolution, the kernel entries
that meet pixel :math:`i`, placed at the output positions whose receptive field holds it — at
most ``kh * kw`` positions, the same for every network, found once by unfolding an image of
pixel indices. So one evaluation of the layer at :math:`x_0` and a scatter of
:math:`\pm h` times weights give the first layer's outputs for all ``2d`` inputs exactly
(up to the rounding of a different summation order), and the rest of the network runs on
them: the layer's ``forward`` is replaced for the call by one that returns them.

Used only where this is checked to be exact (:func:`find_first_layer`): one leaf module
receives the network's input tensor itself, it is called once, it is exactly
``nn.Linear``/``nn.Conv2d`` with supported settings, and the network evaluated with that
module's output injected and a NaN input equals the plain forward on a few secant inputs (so
the input reaches the output through that module only). Otherwise the caller evaluates the
whole network.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FirstLayer:
    """The linear first layer of a network and the index structure of its columns.

    Attributes:
        name: Qualified name of the module (its parameters are ``name + ".weight"`` etc.).
        module: The module in the template network.
        out_shape: Shape of the layer's output for one input.
    """

    def __init__(self, name: str, module: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.name, self.module = name, module
        d = math.prod(input_shape)
        if isinstance(module, nn.Linear):
            # column i of A is weight[:, i]: one "position" (l = 0), kernel index k = i
            self.out_shape: tuple[int, ...] = (module.out_features,)
            pix = torch.arange(d)
            kk, ll = pix.clone(), torch.zeros(d, dtype=torch.long)
            self.positions = 1
        else:
            assert isinstance(module, nn.Conv2d)
            # unfold an image of (pixel index + 1): entry (k, l) names the pixel at kernel
            # offset k of output position l (0: zero padding); exact in float64
            img = torch.arange(1, d + 1, dtype=torch.float64).reshape(1, *input_shape)
            cols = F.unfold(
                img,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,  # type: ignore[arg-type]
                stride=module.stride,
            )[0]
            kk, ll = (cols > 0).nonzero(as_tuple=True)
            pix = cols[kk, ll].long() - 1
            probe = F.conv2d(
                torch.zeros(1, *input_shape),
                torch.zeros(module.out_channels, *module.weight.shape[1:]),
                stride=module.stride,
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,
            )
            self.out_shape = tuple(probe.shape[1:])
            self.positions = cols.shape[1]
        order = torch.argsort(pix, stable=True)
        self.pix, self.kk, self.ll = pix[order], kk[order], ll[order]
        counts = torch.bincount(self.pix, minlength=d)
        self.starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()

    def to(self, device: torch.device) -> FirstLayer:
        """Move the index tensors to ``device``."""
        self.pix, self.kk, self.ll = (t.to(device) for t in (self.pix, self.kk, self.ll))
        return self

    def outputs(
        self, params: dict[str, Tensor], x0: Tensor, i0: int, i1: int, step: float
    ) -> Tensor:
        r"""First-layer outputs of :math:`x_0 + h e_i`, then of :math:`x_0 - h e_i` (block).

        Args:
            params: The network's parameters (``functional_call`` names).
            x0: ``(*input_shape)`` evaluation point.
            i0: First basis vector of the block.
            i1: End of the block.
            step: :math:`h`.

        Returns:
            ``(2 (i1 - i0), *out_shape)``: rows ``j`` and ``j + i1 - i0`` are
            :math:`A(x_0 \pm h e_{i_0 + j}) + b`.
        """
        weight = params[self.name + ".weight"]
        bias = params.get(self.name + ".bias")
        m = self.module
        if isinstance(m, nn.Linear):
            base = F.linear(x0.reshape(1, -1), weight, bias)[0]
        else:
            assert isinstance(m, nn.Conv2d)
            base = F.conv2d(x0[None], weight, bias, m.stride, m.padding, m.dilation)[0]  # type: ignore[arg-type]
        cout = weight.shape[0]
        b = i1 - i0
        a, z = self.starts[i0], self.starts[i1]
        rows, k, pos = self.pix[a:z] - i0, self.kk[a:z], self.ll[a:z]
        out = base.reshape(1, cout, self.positions).expand(2 * b, -1, -1).contiguous()
        delta = step * weight.reshape(cout, -1).T[k]  # (nnz, C): h A e_i at its positions
        # each (input, position) pair occurs once: plain indexed updates are exact
        view = out.transpose(1, 2)  # (2b, L, C), a view: adjacent indices also under vmap
        view[rows, pos] += delta
        view[rows + b, pos] -= delta
        return out.reshape(2 * b, *self.out_shape)

    @contextmanager
    def injected(self, holder: list[Tensor]) -> Iterator[None]:
        """Within the context, the module's forward returns ``holder[0]`` (its input unused)."""

        def forward(*args: Any, **kwargs: Any) -> Tensor:
            return holder[0]

        own = self.module.__dict__.get("forward")
        self.module.forward = forward  # type: ignore[method-assign]
        try:
            yield
        finally:
            if own is None:
                del self.module.forward
            else:
                self.module.forward = own  # type: ignore[method-assign]


def find_first_layer(
    model: nn.Module, x0: Tensor, step: float, indices: list[int] | None = None
) -> FirstLayer | None:
    """The linear layer the network's input goes through alone, or ``None`` (see module doc).

    Args:
        model: The template network (``eval()``), on ``x0``'s device and dtype.
        x0: ``(*input_shape)`` evaluation point.
        step: :math:`h` (the check uses the secant inputs themselves).
        indices: Basis vectors of the check (default: first, middle and last).

    Returns:
        The :class:`FirstLayer`, or ``None`` when the shortcut would not be exact.
    """
    shape = tuple(x0.shape)
    x = x0[None].clone()
    receivers: list[tuple[str, nn.Module]] = []
    calls: dict[int, int] = {}
    names = {id(m): n for n, m in model.named_modules() if n}

    def pre_hook(module: nn.Module, args: Any) -> None:
        calls[id(module)] = calls.get(id(module), 0) + 1
        if args and args[0] is x and id(module) in names and not list(module.children()):
            receivers.append((names[id(module)], module))

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    if len(receivers) != 1:
        return None
    name, module = receivers[0]
    if calls[id(module)] != 1 or not _supported(module, shape):
        return None
    layer = FirstLayer(name, module, shape).to(x0.device)
    d = x0.numel()
    idx = sorted(set(indices if indices is not None else [0, d // 2, d - 1]))
    basis = torch.zeros(len(idx), d, dtype=x0.dtype, device=x0.device)
    basis[torch.arange(len(idx)), torch.tensor(idx)] = step
    inputs = torch.cat([x0.reshape(1, d) + basis, x0.reshape(1, d) - basis]).reshape(-1, *shape)
    params = {n: p.detach() for n, p in model.named_parameters()}
    nan_input = torch.full_like(x0, float("nan"))[None].expand(inputs.shape[0], *shape)
    try:
        with torch.no_grad():
            expected = model(inputs)
            first = [layer.outputs(params, x0, i, i + 1, step) for i in idx]
            holder = [torch.cat([f[:1] for f in first] + [f[1:] for f in first])]
            with layer.injected(holder):
                got = model(nan_input)
    except Exception:
        return None
    if not isinstance(got, Tensor) or not isinstance(expected, Tensor):
        return None
    if got.shape != expected.shape or not bool(torch.isfinite(got).all()):
        return None
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = 1e-3 * scale + 1e-6 if x0.dtype != torch.float64 else 1e-9 * scale + 1e-12
    if float((got - expected).abs().max()) > tol:
        return None
    return layer


def _supported(module: nn.Module, shape: tuple[int, ...]) -> bool:
    if type(module) is nn.Linear:
        return len(shape) == 1 and shape[0] == module.in_features
    if type(module) is nn.Conv2d:
        return (
            len(shape) == 3
            and shape[0] == module.in_channels
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
    return False


_ELEMENTWISE: dict[Any, Callable[[Tensor], Tensor]] = {
    F.relu: torch.relu,
    torch.relu: torch.relu,
    torch.tanh: torch.tanh,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    F.tanh: torch.tanh,
}
_ELEMENTWISE_MODULES: dict[type, Callable[[Tensor], Tensor]] = {
    nn.ReLU: torch.relu,
    nn.Tanh: torch.tanh,
    nn.Sigmoid: torch.sigmoid,
    nn.Identity: lambda t: t,
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
    :func:`torch.fx.symbolic_trace`), the input
    :math:`x_0 \pm h e_i` changes the convolution's output only at the positions whose
    receptive field holds pixel :math:`i`, hence the pooled map only in the windows that meet
    them (at most a few). The chain's output is the one at :math:`x_0` with those pooled
    values replaced; each is computed from the base convolution plus :math:`\pm h` times the
    kernel entries, through the same activations and a max over its window — the same
    operations on the same values as the network's (up to the convolution's summation order).
    The rest of the network (``tail``: the traced graph with the chain's output as an input)
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
        a = torch.arange(hp)[:, None, None, None] * sh + torch.arange(kh)[None, None, :, None]
        b = torch.arange(wp)[None, :, None, None] * sw + torch.arange(kw)[None, None, None, :]
        windows = (a * w + b).reshape(hp * wp, kh * kw)
        # pooled windows each pixel changes: max-pool the pixel's hit map, in chunks
        pix, ll = layer.pix.cpu(), layer.ll.cpu()
        affected: list[Tensor] = []
        chunk = max(1, 2**22 // positions)
        for i0 in range(0, d, chunk):
            i1 = min(d, i0 + chunk)
            lo, hi = layer.starts[i0], layer.starts[i1]
            hit = torch.zeros(i1 - i0, positions)
            hit[pix[lo:hi] - i0, ll[lo:hi]] = 1.0
            pooled = F.max_pool2d(hit.view(-1, 1, h, w), (kh, kw), (sh, sw)).flatten(1) > 0
            affected.append(pooled)
        hits = torch.cat(affected)  # (d, Lp)
        counts = hits.sum(1)
        slots = max(1, int(counts.max()))
        # the j-th affected window of each pixel; pad with its first (same value written
        # twice), or window 0 without change when a pixel changes nothing
        rank = hits.long().cumsum(1) - 1
        q = torch.zeros(d, slots, dtype=torch.long)
        rows, cols = hits.nonzero(as_tuple=True)
        q[rows, rank[rows, cols]] = cols
        pad = torch.arange(slots)[None, :] >= counts[:, None]
        q = torch.where(pad, q[:, :1], q)
        self.qidx = q
        lpos = windows[q]  # (d, Q, T)
        # kernel entry of pixel i at conv position l (K: none) by a sorted-key lookup
        k_cols = math.prod(layer.module.weight.shape[1:])  # type: ignore[union-attr,index]
        keys = pix * positions + ll
        order = torch.argsort(keys)
        keys, kk = keys[order], layer.kk.cpu()[order]
        query = torch.arange(d)[:, None, None] * positions + lpos
        at = torch.searchsorted(keys, query).clamp(max=keys.numel() - 1)
        self.kidx = torch.where(keys[at] == query, kk[at], torch.full_like(at, k_cols))
        self.lpos = lpos
        self.lpos_t = lpos.permute(2, 0, 1).contiguous()  # (T, d, Q)
        self.kidx_t = self.kidx.permute(2, 0, 1).contiguous()
        self.stage2: _SecondStage | None = None

    def to(self, device: torch.device) -> LocalPrefix:
        """Move the index tensors to ``device``."""
        for attr in ("qidx", "lpos", "kidx", "lpos_t", "kidx_t"):
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
        m = self.layer.module
        assert isinstance(m, nn.Conv2d)
        weight = params[self.layer.name + ".weight"]
        bias = params.get(self.layer.name + ".bias")
        base = F.conv2d(x0[None], weight, bias, m.stride, m.padding, m.dilation)  # type: ignore[arg-type]
        c = weight.shape[0]
        b = i1 - i0
        flat_w = torch.cat([weight.reshape(c, -1), weight.new_zeros(c, 1)], dim=1)
        # (C, T, b, Q): window entry t of the Q changed windows of each pixel
        around = base.reshape(c, -1)[:, self.lpos_t[:, i0:i1]]
        delta = flat_w[:, self.kidx_t[:, i0:i1]].mul_(step)
        pre = torch.cat([around + delta, around.sub_(delta)], dim=2)  # (C, T, 2b, Q)
        for fn in self.before:
            pre = fn(pre)
        vals = _max_over(pre, 1)  # (C, 2b, Q)
        for fn in self.after:
            vals = fn(vals)
        if self.stage2 is not None:
            p0 = self._chain_at(base)[0]
            return self.stage2.outputs(params, p0, vals, self.qidx[i0:i1], i0, i1)
        out_base = self._chain_at(base).reshape(1, c, -1)
        out = out_base.expand(2 * b, -1, -1).contiguous()
        q = self.qidx[i0:i1].repeat(2, 1)  # (2b, Q)
        rows = torch.arange(2 * b, device=q.device)[:, None].expand_as(q)
        out[rows, :, q] = vals.permute(1, 2, 0)
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
    if not _supported(module, shape) or type(module) is not nn.Conv2d:
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
            prefix.stage2 = _SecondStage(
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
    if type(m) is not nn.Conv2d or m.groups != 1 or m.padding_mode != "zeros":
        return None
    if isinstance(m.padding, str) or m.stride != (1, 1) or m.dilation != (1, 1):
        return None
    if sum(1 for n in graph.nodes if n.op == "call_module" and n.target == user.target) != 1:
        return None
    return user


def _tail_matches(model: nn.Module, prefix: LocalPrefix, x0: Tensor, step: float) -> bool:
    """The tail on the prefix's outputs equals the plain forward on a few secant inputs."""
    d, shape = x0.numel(), tuple(x0.shape)
    idx = sorted({0, d // 3, d // 2, d - 1})
    basis = torch.zeros(len(idx), d, dtype=x0.dtype, device=x0.device)
    basis[torch.arange(len(idx)), torch.tensor(idx)] = step
    inputs = torch.cat([x0.reshape(1, d) + basis, x0.reshape(1, d) - basis]).reshape(-1, *shape)
    params = {n: p.detach() for n, p in model.named_parameters()}
    nan_input = torch.full_like(x0, float("nan"))[None].expand(inputs.shape[0], *shape)
    try:
        with torch.no_grad():
            expected = model(inputs)
            first = [prefix.outputs(params, x0, i, i + 1, step) for i in idx]
            h = torch.cat([f[:1] for f in first] + [f[1:] for f in first])
            got = prefix.tail(nan_input, h)
    except Exception:
        return False
    return _close(got, expected, x0.dtype)


def _close(got: Any, expected: Any, dtype: torch.dtype) -> bool:
    if not isinstance(got, Tensor) or not isinstance(expected, Tensor):
        return False
    if got.shape != expected.shape or not bool(torch.isfinite(got).all()):
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = 1e-3 * scale + 1e-6 if dtype != torch.float64 else 1e-9 * scale + 1e-12
    return float((got - expected).abs().max()) <= tol


def _elementwise(gm: nn.Module, node: Any) -> Callable[[Tensor], Tensor] | None:
    extra_args = len(node.args) > 1 or any(k != "inplace" for k in node.kwargs)
    if extra_args:
        return None
    if node.op == "call_function":
        return _ELEMENTWISE.get(node.target)
    if node.op == "call_method":
        return _ELEMENTWISE_METHODS.get(str(node.target))
    if node.op == "call_module":
        return _ELEMENTWISE_MODULES.get(type(gm.get_submodule(str(node.target))))
    return None


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
    pair = _pair(kernel)
    strides = pair if stride is None or stride == [] or stride == () else _pair(stride)
    if pair is None or strides is None or ceil or indices:
        return None
    if _pair(padding) != (0, 0) or _pair(dilation) != (1, 1):
        return None
    return pair, strides


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return int(value[0]), int(value[1])
    return None


class _SecondStage:
    r"""``conv2 -> act* -> max_pool2d -> act*`` after a :class:`LocalPrefix`'s chain, locally.

    The prefix changes its output map :math:`P` only at a few positions (a box per pixel);
    ``conv2`` is linear, so :math:`\text{conv2}(P_0 + \Delta P) = \text{conv2}(P_0) +
    \text{conv2}_{\text{no bias}}(\Delta P)`, the second term a full-padding convolution of the
    small :math:`\Delta P` box. Only the pooling windows it reaches are recomputed (base values
    plus the change, activations, max); the other pooled values are the base point's.
    Requires ``conv2`` with stride 1, dilation 1, one group, zero padding and a pooling with
    kernel = stride, no padding.
    """

    def __init__(
        self,
        name: str,
        module: nn.Conv2d,
        before: list[Callable[[Tensor], Tensor]],
        pool: tuple[tuple[int, int], tuple[int, int]],
        after: list[Callable[[Tensor], Tensor]],
        in_shape: tuple[int, int, int],
        qidx: Tensor,
    ) -> None:
        self.name, self.module, self.before, self.after = name, module, before, after
        (kh, kw), _ = pool
        self.pool = (kh, kw)
        _, h1, w1 = in_shape
        ph, pw = _pair(module.padding) or (0, 0)
        ch, cw = module.kernel_size
        h2, w2 = h1 + 2 * ph - ch + 1, w1 + 2 * pw - cw + 1
        hp, wp = h2 // kh, w2 // kw
        self.out_shape = (module.out_channels, hp, wp)
        d = qidx.shape[0]
        qr, qc = qidx // w1, qidx % w1  # (d, Q)
        o_r, o_c = qr.min(1).values, qc.min(1).values  # box origin per pixel
        bh = int((qr.max(1).values - o_r).max()) + 1
        bw = int((qc.max(1).values - o_c).max()) + 1
        self.box = (bh, bw)
        self.slot_idx = (qr - o_r[:, None]) * bw + (qc - o_c[:, None])  # (d, Q) in the box
        # change of conv2 at rows lo .. lo + dh - 1 (full-padding convolution of the box)
        dh, dw = bh + ch - 1, bw + cw - 1
        lo_r, lo_c = o_r + ph - (ch - 1), o_c + pw - (cw - 1)
        win_r0 = torch.div(lo_r, kh, rounding_mode="floor")
        win_c0 = torch.div(lo_c, kw, rounding_mode="floor")
        nh = int((torch.div(lo_r + dh - 1, kh, rounding_mode="floor") - win_r0).max()) + 1
        nw = int((torch.div(lo_c + dw - 1, kw, rounding_mode="floor") - win_c0).max()) + 1
        self.windows = (nh, nw)
        ah, aw = nh * kh, nw * kw  # conv2 box of the windows, from row win_r0 * kh
        y = torch.arange(ah)[None, :, None]
        x = torch.arange(aw)[None, None, :]
        rows2 = win_r0[:, None, None] * kh + y  # (d, ah, 1) conv2 rows
        cols2 = win_c0[:, None, None] * kw + x
        # conv2 canvas with margins so every box fits; values outside feed only dropped windows
        self.margin2 = (
            max(0, -int(rows2.min()), int(rows2.max()) - h2 + 1),
            max(0, -int(cols2.min()), int(cols2.max()) - w2 + 1),
        )
        m2r, m2c = self.margin2
        canvas_w2 = w2 + 2 * m2c
        self.base_idx = ((rows2 + m2r) * canvas_w2 + (cols2 + m2c)).reshape(d, -1)
        jr, jc = rows2 - lo_r[:, None, None], cols2 - lo_c[:, None, None]
        inside = (jr >= 0) & (jr < dh) & (jc >= 0) & (jc < dw)
        self.delta_idx = torch.where(inside, jr * dw + jc, torch.full_like(jr * jc, dh * dw))
        self.delta_idx = self.delta_idx.reshape(d, -1)
        self.delta_shape = (dh, dw)
        # pooled windows: canvas with margins, cropped to the valid ones afterwards
        pr = win_r0[:, None, None] + torch.arange(nh)[None, :, None]
        pc = win_c0[:, None, None] + torch.arange(nw)[None, None, :]
        self.margin_p = (
            max(0, -int(pr.min()), int(pr.max()) - hp + 1),
            max(0, -int(pc.min()), int(pc.max()) - wp + 1),
        )
        mpr, mpc = self.margin_p
        self.pool_idx = ((pr + mpr) * (wp + 2 * mpc) + (pc + mpc)).reshape(d, -1)

    def to(self, device: torch.device) -> _SecondStage:
        """Move the index tensors to ``device``."""
        for attr in ("slot_idx", "base_idx", "delta_idx", "pool_idx"):
            setattr(self, attr, getattr(self, attr).to(device))
        return self

    def outputs(
        self,
        params: dict[str, Tensor],
        p0: Tensor,
        changed: Tensor,
        qidx: Tensor,
        i0: int,
        i1: int,
    ) -> Tensor:
        """Outputs ``(2b, *out_shape)`` from the prefix's base map and changed values.

        Args:
            params: The network's parameters.
            p0: ``(C1, H1, W1)`` the prefix's output at :math:`x_0`.
            changed: ``(C1, 2b, Q)`` its values at the changed positions ``qidx``.
            qidx: ``(b, Q)`` the changed positions (flat) of the block's pixels.
            i0: First basis vector of the block.
            i1: End of the block.
        """
        m = self.module
        weight = params[self.name + ".weight"]
        bias = params.get(self.name + ".bias")
        c1 = p0.shape[0]
        b2 = changed.shape[1]
        b = b2 // 2
        base_p = p0.reshape(c1, -1)[:, qidx]  # (C1, b, Q)
        dp = (changed.view(c1, 2, b, -1) - base_p[:, None]).permute(1, 2, 0, 3)  # (2, b, C1, Q)
        bh, bw = self.box
        slots = self.slot_idx[i0:i1][None, :, None, :].expand(2, -1, c1, -1)
        box = torch.zeros(2, b, c1, bh * bw, dtype=dp.dtype, device=dp.device)
        box = box.scatter(3, slots, dp)  # a repeated slot writes the same value again
        ch, cw = m.kernel_size
        delta = F.conv2d(box.view(b2, c1, bh, bw), weight, None, 1, (ch - 1, cw - 1))
        o = weight.shape[0]
        delta = F.pad(delta.reshape(2, b, o, -1), (0, 1))  # last entry: no change
        base2 = F.conv2d(p0[None], weight, bias, 1, m.padding)[0]  # type: ignore[arg-type]
        m2r, m2c = self.margin2
        canvas = F.pad(base2, (m2c, m2c, m2r, m2r)).reshape(o, -1)
        around = canvas[:, self.base_idx[i0:i1]].permute(1, 0, 2)  # (b, O, A)
        di = self.delta_idx[i0:i1][None, :, None, :].expand(2, -1, o, -1)
        vals = torch.gather(delta, 3, di).add_(around).view(b2, o, -1)
        for fn in self.before:
            vals = fn(vals)
        (kh, kw), (nh, nw) = self.pool, self.windows
        pooled = _max_over(vals.view(b2, o, nh, kh, nw * kw), 3)  # (2b, O, nh, nw * kw)
        pooled = _max_over(pooled.view(b2, o, nh, nw, kw), 4).reshape(2, b, o, -1)
        for fn in self.after:
            pooled = fn(pooled)
        base_pool = F.max_pool2d(_apply(self.before, base2[None]), self.pool)
        base_pool = _apply(self.after, base_pool)[0]
        mpr, mpc = self.margin_p
        out = F.pad(base_pool, (mpc, mpc, mpr, mpr))
        hpc, wpc = out.shape[1:]
        out = out.reshape(1, 1, o, -1).expand(2, b, -1, -1).contiguous()
        pi = self.pool_idx[i0:i1][None, :, None, :].expand(2, -1, o, -1)
        out = out.scatter(3, pi, pooled)
        _, hp, wp = self.out_shape
        out = out.view(b2, o, hpc, wpc)[:, :, mpr : mpr + hp, mpc : mpc + wp]
        return out.contiguous()


def _max_over(t: Tensor, dim: int) -> Tensor:
    """``t.amax(dim)`` by elementwise maxima of its slices (faster for a short ``dim``)."""
    out = t.select(dim, 0)
    for j in range(1, t.shape[dim]):
        out = torch.maximum(out, t.select(dim, j))
    return out


def _apply(fns: list[Callable[[Tensor], Tensor]], t: Tensor) -> Tensor:
    for fn in fns:
        t = fn(t)
    return t
