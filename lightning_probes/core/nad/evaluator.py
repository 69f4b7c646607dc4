r"""Evaluating networks for NADs: input gradients of random networks, and of a trained one.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. Used by :func:`~lightning_probes.core.nad.network_gradients`, which draws the
networks and reduces their outputs, and by :class:`~lightning_probes.callbacks.nad.NADCallback`:

- ``ChunkEvaluator``: the gradients of a chunk of freshly initialised networks at the
  evaluation point :math:`x_0` — the authors' central differences with step :math:`h` along
  every input basis vector (or autograd), the ``2d`` perturbed inputs in blocks sized from the
  memory budget, the networks of a chunk stacked and evaluated together by
  :func:`torch.func.vmap` over :func:`torch.func.functional_call` (a loop where vmap fails);
  the first layer's outputs (or a local ``conv -> activations -> max_pool2d`` start) built
  without evaluating it where :mod:`~lightning_probes.core.nad.local` or
  :mod:`~lightning_probes.core.nad.first_layer` finds that exact.
- :func:`input_gradient_energy`: how a trained network's input Jacobian distributes over the
  NADs (re-exported by :mod:`lightning_probes.core.nad.directions`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lightning_probes.core.nad.first_layer import FirstLayer, find_first_layer
from lightning_probes.core.nad.local import LocalPrefix, find_local_prefix

GradientEstimator = Literal["secant", "autograd"]
"""How a network's input gradient is taken: the authors' central differences, or autograd."""


def input_gradient_energy(
    model: nn.Module,
    inputs: Tensor,
    directions: Tensor,
    *,
    output_fn: Callable[[Any], Tensor] | None = None,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    r"""How a (trained) network's input Jacobian distributes over a NAD basis.

    .. math:: e_i = \frac{1}{n}\sum_{n}\sum_{c} \langle u_i, \nabla_x f_c(x_n)\rangle^2
        = u_i^\top C u_i, \qquad C = \frac{1}{n}\sum_n J_n^\top J_n,

    the input-gradient (uncentred) covariance :math:`C` seen along each NAD :math:`u_i`
    (uncentred so that a linear model's constant gradient counts). With a complete basis
    :math:`\sum_i e_i = \operatorname{tr} C`. Costs one backward pass per output.

    Args:
        model: The network, in the mode to evaluate (``eval()``: samples independent); its
            parameters and their ``.grad`` are not touched.
        inputs: ``(n, *input_shape)`` samples.
        directions: ``(k, *input_shape)`` orthonormal NADs.
        output_fn: Maps the model output to a ``(n, o)`` tensor (for dict/tuple outputs).
        chunk_size: Samples per forward/backward pass.

    Returns:
        ``(energy (k,), total ())`` in float64, ``total`` = :math:`\operatorname{tr} C`.
    """
    u = directions.reshape(directions.shape[0], -1).detach()
    energy = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    total = torch.zeros((), dtype=torch.float64, device=u.device)
    n = inputs.shape[0]
    with torch.enable_grad():
        for start in range(0, n, chunk_size):
            x = inputs[start : start + chunk_size].detach().clone().requires_grad_(True)
            out = model(x)
            out = output_fn(out) if output_fn is not None else out
            out = out.reshape(x.shape[0], -1)
            for c in range(out.shape[1]):
                (g,) = torch.autograd.grad(out[:, c].sum(), x, retain_graph=c + 1 < out.shape[1])
                flat = g.reshape(x.shape[0], -1).double()
                energy += (flat @ u.double().T).square().sum(0)
                total += flat.square().sum()
    return energy / n, total / n


class ChunkEvaluator:
    """Gradients of a chunk of networks at ``x0``: one vmapped call per block of inputs."""

    def __init__(
        self,
        template: nn.Module,
        x0: Tensor,
        method: GradientEstimator,
        step: float,
        proj_seed: int,
        device: torch.device | str | None,
    ) -> None:
        self.template = template.eval()
        first = next(iter(template.parameters()), None)
        self.device = torch.device(device) if device is not None else _device_of(template)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        self.template.to(self.device)
        self.x0 = x0.to(self.device, dtype)
        self.method, self.step = method, step
        self.vectorize = True
        self.vectorize_first = True
        sample_bytes, outputs = _activation_bytes(self.template, self.x0)
        self.sample_bytes = sample_bytes
        self.projection: Tensor | None = None
        if outputs > 1:
            gen = torch.Generator().manual_seed(proj_seed)
            u = torch.randn(outputs, generator=gen, dtype=torch.float64, device="cpu")
            self.projection = (u / u.norm()).to(self.device, dtype)
        cuda = self.device.type == "cuda"
        # CPU: one network per call on cache-sized blocks of inputs is fastest (vmap turns
        # later convolutions into grouped ones, slower on CPU); GPU: many networks per call.
        self.default_chunk_size = 128 if cuda else 1
        # CPU: 256 MiB of activations per call; on a ResNet-18 (width 8, 3x32x32) 32 MiB gave
        # calls of 8 inputs, 2.4 s a network, 256 MiB 1.05 s (the 2·d forwards' minimum: 1.0 s)
        self.default_budget = 2**30 if cuda else 2**28
        self.block = 1
        # a linear first layer applied to the input alone: its outputs on the secant inputs
        # are built from its weights instead of evaluated (`core.nad.local`, `core.nad.first_layer`)
        self.first: FirstLayer | LocalPrefix | None = None
        self.tail_names: set[str] = set()
        if method == "secant":
            self.first = find_local_prefix(self.template, self.x0, step)
            if self.first is not None:
                tail = self.first.tail
                self.tail_names = {n for n, _ in tail.named_parameters()}
                self.tail_names |= {n for n, _ in tail.named_buffers()}
            else:
                self.first = find_first_layer(self.template, self.x0, step)
        if isinstance(self.first, LocalPrefix) and not cuda:
            # its rows hold a few pooled values, not the first layers' maps, so the estimate
            # above is several times too high; measured on LeNet, 64 MiB is fastest (fewer
            # calls than 32 MiB, no page-fault cost of the fresh large allocations of 256 MiB)
            self.default_budget = 2**26

    def plan(self, chunk_size: int, memory_budget: int | None) -> None:
        """Choose the number of basis vectors (secant) per call from the memory budget."""
        budget = memory_budget or self.default_budget
        d = self.x0.numel()
        self.block = max(1, min(d, budget // max(1, 2 * chunk_size * self.sample_bytes)))

    def __call__(self, states: list[tuple[dict[str, Tensor], dict[str, Tensor]]]) -> Tensor:
        """Secant (or autograd) input gradients of the networks in ``states``, ``[m, d]``."""
        params = {k: torch.stack([s[0][k] for s in states]).to(self.device) for k in states[0][0]}
        buffers = {k: torch.stack([s[1][k] for s in states]).to(self.device) for k in states[0][1]}
        if self.method == "autograd":
            x = self.x0.expand(len(states), *self.x0.shape).clone().requires_grad_(True)
            with torch.enable_grad():
                y = self._scalar(self._forward(params, buffers, x.unsqueeze(1), batched_x=True))
                (g,) = torch.autograd.grad(-y.sum(), x)
            return g.reshape(len(states), -1).detach()
        d = self.x0.numel()
        flat = self.x0.reshape(1, d)
        cols = []
        with torch.no_grad():
            for i0 in range(0, d, self.block):
                i1 = min(d, i0 + self.block)
                b = i1 - i0
                if self.first is not None:
                    first_out = self._first_outputs(params, i0, i1)
                    dummy = self.x0.expand(2 * b, *self.x0.shape)  # unused: layer injected
                    y = self._scalar(self._forward(params, buffers, dummy, first_out=first_out))
                else:
                    idx = torch.arange(i0, i1, device=self.device)
                    x = flat.repeat(2 * b, 1)
                    rows = torch.arange(b, device=self.device)
                    x[rows, idx] += self.step
                    x[rows + b, idx] -= self.step
                    x = x.reshape(2 * b, *self.x0.shape)
                    y = self._scalar(self._forward(params, buffers, x))
                # f = -net:  (f(x0 + h e_i) - f(x0 - h e_i)) / 2h
                cols.append((y[:, b:] - y[:, :b]) / (2 * self.step))
        return torch.cat(cols, dim=1)

    def _first_outputs(self, params: dict[str, Tensor], i0: int, i1: int) -> Tensor:
        """``(g, 2b, ...)`` the shortcut's outputs for each network (vmapped when g > 1)."""
        first = self.first
        assert first is not None
        g = next(iter(params.values())).shape[0]
        if g == 1:
            return first.outputs({k: v[0] for k, v in params.items()}, self.x0, i0, i1, self.step)[
                None
            ]
        if self.vectorize_first:
            try:
                return vmap(lambda p: first.outputs(p, self.x0, i0, i1, self.step))(params)
            except Exception:  # an op without a batching rule: a loop gives the same values
                self.vectorize_first = False
        return torch.stack(
            [
                first.outputs({k: v[j] for k, v in params.items()}, self.x0, i0, i1, self.step)
                for j in range(g)
            ]
        )

    def _scalar(self, out: Tensor) -> Tensor:
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return out[..., 0] if self.projection is None else out @ self.projection

    def _forward(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Tensor,
        batched_x: bool = False,
        first_out: Tensor | None = None,
    ) -> Tensor:
        """The networks' outputs ``(g, batch, ...)``.

        ``first_out`` ``(g, batch, ...)``: the first layer's outputs, injected in place of
        evaluating it (``x`` is then unused).
        """
        holder: list[Tensor] = []

        def call(
            p: dict[str, Tensor], b: dict[str, Tensor], xx: Tensor, hh: Tensor | None
        ) -> Tensor:
            if hh is not None and isinstance(self.first, LocalPrefix):
                state = {k: v for k, v in {**p, **b}.items() if k in self.tail_names}
                return _as_tensor(functional_call(self.first.tail, state, (xx, hh)))
            if hh is not None:
                holder[:] = [hh]
            return _as_tensor(functional_call(self.template, (p, b), (xx,)))

        g = next(iter(params.values())).shape[0]
        inject = (
            self.first.injected(holder)
            if isinstance(self.first, FirstLayer) and first_out is not None
            else nullcontext()
        )
        with inject:
            if g > 1 and self.vectorize:
                try:
                    dims = (0, 0, 0 if batched_x else None, 0 if first_out is not None else None)
                    return vmap(call, in_dims=dims)(params, buffers, x, first_out)
                except Exception as err:  # ops without a batching rule: fall back to a loop
                    self.vectorize = False
                    warnings.warn(
                        f"NADs: evaluating the networks one at a time, since vmap failed "
                        f"({type(err).__name__}: {err}).",
                        stacklevel=4,
                    )
            return torch.stack(
                [
                    call(
                        {k: v[j] for k, v in params.items()},
                        {k: v[j] for k, v in buffers.items()},
                        x[j] if batched_x else x,
                        first_out[j] if first_out is not None else None,
                    )
                    for j in range(g)
                ]
            )


def _as_tensor(out: Any) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Expected the network to return a Tensor, got {type(out).__name__}. Wrap it so "
            "`model_factory()` returns a module with a tensor output."
        )
    return out


def _device_of(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _activation_bytes(model: nn.Module, x0: Tensor) -> tuple[int, int]:
    """(bytes of activations for one input, estimated, number of outputs)."""
    sizes: list[int] = []

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            out = _as_tensor(model(x0.unsqueeze(0)))
    finally:
        for h in handles:
            h.remove()
    # x3: functional ops (relu, pooling) between modules are not seen by hooks
    return 3 * (sum(sizes) + x0.numel() * x0.element_size()), out[0].numel()


def network_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Detached copies of a network's parameters and buffers, after switching it to ``eval()``.

    NADs are computed on untrained networks in evaluation mode (DESIGN.md, method notes); the
    :class:`ChunkEvaluator` takes a list of these states and stacks them for ``vmap``.

    Returns:
        ``(parameters, buffers)``, each a dict of detached clones keyed by name.
    """
    model.eval()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return params, {k: v.detach().clone() for k, v in model.named_buffers()}
