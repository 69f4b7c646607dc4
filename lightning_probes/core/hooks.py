"""Scoped forward hooks: capture a layer's input/output, or replace its output.

Every hook is registered inside a context manager and removed in ``finally``, so nothing is
ever left on the user's model, even when the probe raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_probes.core.modules import layer_output


@dataclass
class Captured:
    """What :func:`capture` recorded for one layer during the forward passes in its scope.

    Attributes:
        inputs: The first positional input of each call, in call order.
        outputs: The output of each call, in call order.
    """

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Number of times the layer ran."""
        return max(len(self.inputs), len(self.outputs))

    @property
    def output(self) -> Tensor:
        """The output of the single call (raises if the layer ran more or less than once)."""
        return _single(self.outputs, "output")

    @property
    def input(self) -> Tensor:
        """The input of the single call (raises if the layer ran more or less than once)."""
        return _single(self.inputs, "input")


def _single(values: list[Tensor], what: str) -> Tensor:
    if len(values) != 1:
        raise RuntimeError(
            f"Expected the layer to run exactly once per forward, got {len(values)} calls. "
            "A layer called twice (weight sharing) has no single " + what + "."
        )
    return values[0]


@contextmanager
def capture(
    layers: Mapping[str, nn.Module],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
) -> Iterator[dict[str, Captured]]:
    """Record the inputs and/or outputs of ``layers`` during the forward passes in the scope.

    Args:
        layers: ``{name: module}``, e.g. from
            :func:`~lightning_probes.core.layers.select_layers`.
        inputs: Record each call's first positional input.
        outputs: Record each call's output (must be a tensor; for a layer whose registry entry
            reads a tuple, that tensor: ``nn.MultiheadAttention``'s attention output).
        detach: Record detached copies, safe from later in-place ops on the same storage
            (``False`` records the graph's own tensors, differentiable).

    Yields:
        ``{name: Captured}``, filled as the model runs.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> with capture({"1": net[1]}) as rec:
        ...     _ = net(torch.ones(5, 3))
        >>> rec["1"].output.shape
        torch.Size([5, 2])
    """
    records = {name: Captured() for name in layers}
    handles: list[RemovableHandle] = []

    def make_pre_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        # Inputs are read before the layer runs: an in-place layer (nn.ReLU(inplace=True))
        # overwrites its input, so a post-hook would see the output instead.
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, Tensor):
                records[name].inputs.append(_kept(x, detach))

        return pre_hook

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            output = layer_output(module, output)  # e.g. MultiheadAttention's output[0]
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Expected layer {name!r} to return a Tensor, got "
                    f"{type(output).__name__}. Select a module whose output is a tensor."
                )
            records[name].outputs.append(_kept(output, detach))

        return hook

    try:
        for name, module in layers.items():
            if inputs:
                handles.append(module.register_forward_pre_hook(make_pre_hook(name)))
            if outputs:
                handles.append(module.register_forward_hook(make_hook(name)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _kept(x: Tensor, detach: bool) -> Tensor:
    # A detached record is a copy, not an alias: a later in-place op (``nn.ReLU(inplace=True)``
    # after the layer, ``x += ...`` in a residual block) would otherwise overwrite what was
    # recorded, and a pre-activation read would silently become post-activation.
    # Differentiable records stay the graph's own tensors; autograd rejects in-place changes
    # of those that backward needs.
    return x.detach().clone() if detach else x


@contextmanager
def replace_output(
    layers: Mapping[str, nn.Module],
    fn: Callable[[str, Tensor], Tensor],
) -> Iterator[None]:
    """Replace each layer's output by ``fn(name, output)`` during the forward passes in scope.

    This is how probes intervene on activations (ablation, noise) without touching weights.

    Args:
        layers: ``{name: module}`` to intervene on.
        fn: ``(name, output) -> new_output``; the new output must have a shape the rest of the
            network accepts (usually the same shape).

    Yields:
        Nothing; the intervention is active inside the ``with`` block.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
        >>> with replace_output({"0": net[0]}, lambda name, out: torch.zeros_like(out)):
        ...     net(torch.ones(1, 3)).sum().item()
        0.0
    """
    handles: list[RemovableHandle] = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
            return fn(name, output)

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_calls(model: nn.Module, layers: Mapping[str, nn.Module], *args: Any) -> dict[str, int]:
    """Run ``model(*args)`` without gradients and count how often each layer is called.

    Used to reject layers whose per-layer quantities are ill-defined (a module called twice in
    one forward shares its weights between two places).

    Returns:
        ``{name: number of calls}``.
    """
    counts = dict.fromkeys(layers, 0)

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            counts[name] += 1

        return hook

    handles = [module.register_forward_pre_hook(make_hook(n)) for n, module in layers.items()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return counts
