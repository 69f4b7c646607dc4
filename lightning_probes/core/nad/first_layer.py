r"""NADs, secant method: a linear first layer's outputs built from its weights, not evaluated.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. The authors' central differences evaluate every network on the ``2d`` inputs
:math:`x_0 \pm h e_i`. When the first layer is a linear map :math:`A` with bias :math:`b`
(``nn.Linear``, or ``nn.Conv2d`` with zero padding and one group) applied to the input itself,

.. math:: A(x_0 \pm h e_i) + b = (A x_0 + b) \pm h\, A e_i,

and :math:`A e_i` is column :math:`i` of :math:`A`: for a convolution, the kernel entries
that meet pixel :math:`i`, placed at the output positions whose receptive field holds it (at
most ``kh * kw``, the same for every network, found once by unfolding an image of pixel
indices). Exact up to the rounding of a different summation order. The layer's ``forward`` is
replaced for the call by one returning these outputs (:class:`FirstLayer`);
:mod:`lightning_probes.core.nad.local` goes further for ``conv -> act -> max_pool`` starts.

Used only where checked (:func:`find_first_layer`): one leaf module receives the network's
input tensor itself, is called once and is exactly ``nn.Linear``/``nn.Conv2d`` with supported
settings, and the network with that module's output injected and a NaN input equals the plain
forward on a few secant inputs (so the input reaches the output through that module only).
Otherwise the caller evaluates the whole network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.modules import ops_for


class FirstLayer:
    """The linear first layer of a network and the index structure of its columns.

    Attributes:
        name: Qualified name of the module (its parameters are ``name + ".weight"`` etc.).
        module: The module in the template network.
        out_shape: Shape of the layer's output for one input.
    """

    def __init__(self, name: str, module: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.name, self.module = name, module
        ops = ops_for(module, exact=True)
        assert ops is not None and ops.accepts_input(module, input_shape)  # see `supported`
        self.ops = ops
        d = math.prod(input_shape)
        # column i of A: the kernel entries kk meeting pixel pix at output positions ll
        pix, kk, ll, self.positions, self.out_shape = ops.input_columns(module, input_shape)
        order = torch.argsort(pix, stable=True)
        self.pix, self.kk, self.ll = pix[order], kk[order], ll[order]
        counts = torch.bincount(self.pix, minlength=d)
        self.starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()

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
        base = self.ops.apply(self.module, x0[None], weight, bias)[0]
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
    if calls[id(module)] != 1 or not supported(module, shape):
        return None
    layer = FirstLayer(name, module, shape).to(x0.device)
    d = x0.numel()
    idx = sorted(set(indices if indices is not None else [0, d // 2, d - 1]))
    inputs, nan_input = secant_inputs(x0, idx, step)
    params = {n: p.detach() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():
            expected = model(inputs)
            first = [layer.outputs(params, x0, i, i + 1, step) for i in idx]
            holder = [torch.cat([f[:1] for f in first] + [f[1:] for f in first])]
            with layer.injected(holder):
                got = model(nan_input)
    except Exception:
        return None
    if not outputs_match(got, expected, x0.dtype):
        return None
    return layer


def supported(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether the shortcut handles ``module`` (its exact type's entry) on ``shape``.

    Built in: a ``Linear`` on flat inputs, a ``Conv2d`` with one group and numeric zero padding.
    """
    ops = ops_for(module, exact=True)
    return ops is not None and ops.accepts_input(module, shape)


def secant_inputs(x0: Tensor, indices: list[int], step: float) -> tuple[Tensor, Tensor]:
    """``(x0 + h e_i for i in indices, then x0 - h e_i)`` and a NaN batch of the same shape."""
    d, shape = x0.numel(), tuple(x0.shape)
    basis = torch.zeros(len(indices), d, dtype=x0.dtype, device=x0.device)
    rows = torch.arange(len(indices), device=x0.device)
    basis[rows, torch.tensor(indices, device=x0.device)] = step
    inputs = torch.cat([x0.reshape(1, d) + basis, x0.reshape(1, d) - basis]).reshape(-1, *shape)
    nan_input = torch.full_like(x0, float("nan"))[None].expand(inputs.shape[0], *shape)
    return inputs, nan_input


def outputs_match(got: Any, expected: Any, dtype: torch.dtype) -> bool:
    """Finite and equal up to the rounding of ``dtype`` (a sanity check of the dispatch)."""
    if not isinstance(got, Tensor) or not isinstance(expected, Tensor):
        return False
    if got.shape != expected.shape or not bool(torch.isfinite(got).all()):
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    tol = 1e-3 * scale + 1e-6 if dtype != torch.float64 else 1e-9 * scale + 1e-12
    return float((got - expected).abs().max()) <= tol
