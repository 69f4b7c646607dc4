"""Every probe at a cheap configuration for the tiny test models (used by cross-probe tests).

Each factory takes keyword overrides and returns a callback that runs after every optimizer
step (or epoch, for the epoch-based probes) with ``on_error="raise"``, so a failure is a test
failure rather than a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

import lightning_probes as lp

ProbeFactory = Callable[..., pl.Callback]


def _cka(**kw: Any) -> pl.Callback:
    return lp.LayerCKACallback(**{"every_n_steps": 2, "probe_size": 16, "on_error": "raise", **kw})


def _lca(**kw: Any) -> pl.Callback:
    return lp.LossContributionCallback(
        **{"every_n_steps": 1, "probe_size": 32, "method": "simpson", "on_error": "raise", **kw}
    )


def _ablation(**kw: Any) -> pl.Callback:
    return lp.AblationAUCCallback(
        **{
            "every_n_steps": 2,
            "probe_size": 32,
            "num_orderings": 3,
            "num_points": 5,
            "on_error": "raise",
            **kw,
        }
    )


def _selectivity(**kw: Any) -> pl.Callback:
    return lp.SelectivityCallback(
        **{"every_n_steps": 2, "probe_size": 32, "on_error": "raise", **kw}
    )


def _landscape(**kw: Any) -> pl.Callback:
    return lp.LandscapeCallback(
        **{"every_n_steps": 2, "probe_size": 16, "plane_resolution": 3, "on_error": "raise", **kw}
    )


def _nad(**kw: Any) -> pl.Callback:
    return lp.NADCallback(
        **{"every_n_steps": 2, "probe_size": 16, "num_networks": 16, "on_error": "raise", **kw}
    )


ZOO: dict[str, ProbeFactory] = {
    "cka": _cka,
    "lca": _lca,
    "ablation": _ablation,
    "selectivity": _selectivity,
    "landscape": _landscape,
    "nad": _nad,
}

# probes that look at named layers (accept `layers=`)
LAYERED = ("cka", "ablation", "selectivity", "landscape")
# probes that need class labels
CLASS_TARGETS = ("cka", "ablation", "selectivity")
