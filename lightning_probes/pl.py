"""The probes for ``pytorch_lightning`` (the same classes as the top-level package).

``from lightning_probes.pl import LayerCKACallback`` reads symmetrically to
``from lightning_probes.lightning import LayerCKACallback`` for ``lightning.pytorch``.
"""

from __future__ import annotations

from typing import Any

import lightning_probes
from lightning_probes import CALLBACKS

__all__ = sorted(CALLBACKS)


def __getattr__(name: str) -> Any:
    if name not in CALLBACKS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(lightning_probes, name)


def __dir__() -> list[str]:
    return __all__
