"""Layer selection: which modules of a model a probe looks at.

A "layer" is one module together with the parameters it owns directly (weight and bias),
named as in :meth:`torch.nn.Module.named_modules`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from lightning_probes.core.modules.conv import CONV_TYPES

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_TYPES)
"""Module types selected when neither ``include`` nor ``types`` is given."""

LayerNames = str | Sequence[str] | None
"""A user's layer selection by name: a name or glob, a sequence of them, or ``None`` for the
probe's default selection."""

LayerSelection = LayerNames | Mapping[str, nn.Module]
"""A :data:`LayerNames` selection, or a ready ``{name: module}`` mapping (used as given)."""


def owns_parameters(module: nn.Module) -> bool:
    """Whether ``module`` has at least one parameter of its own (not counting children)."""
    return any(True for _ in module.parameters(recurse=False))


def check_layer_spec(layers: object, arg: str = "layers") -> None:
    """Validate a user's layer selection at construction time (before a model exists).

    Args:
        layers: ``None`` (the probe's default selection), a name/glob, or a non-empty sequence
            of names/globs.
        arg: The argument's name, for the message.

    Raises:
        ValueError: For an empty selection (a probe with nothing to look at).
        TypeError: For anything that is not a string or a sequence of strings.
    """
    if layers is None or isinstance(layers, str):
        return
    if not isinstance(layers, Sequence) or not all(isinstance(n, str) for n in layers):
        raise TypeError(
            f"Expected `{arg}` to be None, a layer name/glob or a list of them, got {layers!r}."
        )
    if len(layers) == 0:
        raise ValueError(
            f"Expected `{arg}` to name at least one layer, got an empty list. Pass "
            f"`{arg}=None` for the probe's default selection."
        )


def select_layers(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    types: type[nn.Module] | Iterable[type[nn.Module]] | None = None,
) -> dict[str, nn.Module]:
    """Select the layers of ``model`` a probe should look at, in forward-definition order.

    Args:
        model: The network.
        include: Names as in ``model.named_modules()``, or ``fnmatch`` globs (``"encoder.*"``).
            Each name or glob must match at least one module. ``None`` selects by ``types``.
        types: Module classes to keep. With ``include=None`` and ``types=None``, every
            ``nn.Linear`` / ``nn.Conv1d/2d/3d`` that owns parameters is selected.

    Returns:
        An ordered ``{name: module}`` dict (order of ``named_modules``).

    Raises:
        ValueError: If a name or glob in ``include`` matches no module (the message lists the
            available names), or if the selection is empty.
        TypeError: If ``include`` or ``types`` has the wrong type.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(select_layers(net))
        ['0', '2']
        >>> list(select_layers(net, include="2"))
        ['2']
    """
    if isinstance(include, str):
        include = [include]
    if include is not None and not all(isinstance(name, str) for name in include):
        raise TypeError(f"Expected `include` to be a str or a sequence of str, got {include!r}.")
    if types is not None:
        types = (types,) if isinstance(types, type) else tuple(types)
        if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
            raise TypeError(f"Expected `types` to be nn.Module subclasses, got {types!r}.")

    named = [(name, module) for name, module in model.named_modules() if name != ""]
    if include is None:
        wanted_types = types if types is not None else DEFAULT_LAYER_TYPES
        selected = {
            name: module
            for name, module in named
            if isinstance(module, wanted_types) and owns_parameters(module)
        }
        if not selected:
            raise ValueError(
                f"No layer of type {', '.join(t.__name__ for t in wanted_types)} with parameters "
                f"found in {type(model).__name__}. Pass `layers=` with names from: "
                f"{_available(named)}."
            )
        return selected

    selected = {}
    for pattern in include:
        matches = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if types is not None:
            matches = [(n, m) for n, m in matches if isinstance(m, types)]
        if not matches:
            raise ValueError(
                f"Layer {pattern!r} not found in {type(model).__name__}. "
                f"Available layers are: {_available(named)}."
            )
        selected.update(matches)
    order = {name: i for i, (name, _) in enumerate(named)}
    return dict(sorted(selected.items(), key=lambda item: order[item[0]]))


def _available(named: list[tuple[str, nn.Module]], limit: int = 40) -> str:
    names = [f"{n} ({type(m).__name__})" for n, m in named]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
