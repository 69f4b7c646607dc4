"""The probes for the unified ``lightning`` package (``lightning.pytorch``).

``lightning_probes.LayerCKACallback`` and friends are ``pytorch_lightning.Callback`` subclasses.
Use this module when your Trainer is ``lightning.pytorch.Trainer``::

    from lightning_probes.lightning import LayerCKACallback

Each class here is the same probe with ``lightning.pytorch.Callback`` added as a base, so it is
an instance of the namespace's ``Callback`` (what ``lightning.pytorch.cli.LightningCLI`` and the
Trainer's type checks expect). The logic is shared and namespace-free: probes only duck-type the
Trainer and module they are handed. State keys are identical in both namespaces, so a checkpoint
written with one resumes with the other.

Requires ``pip install lightning``.
"""

from __future__ import annotations

import importlib
from typing import Any

try:
    from lightning.pytorch import Callback as _LightningCallback
except ImportError as err:  # pragma: no cover - exercised only without the package
    raise ImportError(
        "`lightning_probes.lightning` needs the `lightning` package (`pip install lightning`). "
        "With `pytorch_lightning`, import the probes from `lightning_probes` instead."
    ) from err

from lightning_probes import CALLBACKS

__all__ = sorted(CALLBACKS)

_cache: dict[str, type] = {}


def _for_lightning(cls: type) -> type:
    """``cls`` with ``lightning.pytorch.Callback`` as an additional base, named as ``cls``."""
    return type(
        cls.__name__,
        (cls, _LightningCallback),
        {"__module__": __name__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__},
    )


def __getattr__(name: str) -> Any:
    if name not in CALLBACKS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _cache:
        original = getattr(importlib.import_module(CALLBACKS[name]), name)
        _cache[name] = _for_lightning(original) if isinstance(original, type) else original
    return _cache[name]


def __dir__() -> list[str]:
    return __all__
