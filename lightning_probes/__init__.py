"""lightning_probes: research diagnostics as PyTorch Lightning callbacks, live in TensorBoard.

The callbacks live in :mod:`lightning_probes.callbacks`; the same quantities are available
without Lightning in :mod:`lightning_probes.core` and :mod:`lightning_probes.functional`.
Callbacks are imported lazily, so ``import lightning_probes.core`` never imports Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access); read by `pl` and `lightning`
CALLBACKS = {
    "LossContributionCallback": "lightning_probes.callbacks.lca",
    "AblationAUCCallback": "lightning_probes.callbacks.ablation",
    "SelectivityCallback": "lightning_probes.callbacks.selectivity",
    "LayerCKACallback": "lightning_probes.callbacks.cka",
    "NADCallback": "lightning_probes.callbacks.nad",
    "LandscapeCallback": "lightning_probes.callbacks.landscape",
    "ProbeCallback": "lightning_probes.callbacks.base",
    "ProbeSchedule": "lightning_probes.callbacks.schedule",
}

__all__ = [*CALLBACKS, "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import lightning_probes.core` must not import Lightning (see DESIGN.md).
    if name in CALLBACKS:
        return getattr(importlib.import_module(CALLBACKS[name]), name)
    raise AttributeError(f"module 'lightning_probes' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
