"""Offline replay: run the probes over a run's saved checkpoints, as if they had run live.

:func:`replay_checkpoints` is the API; ``python -m lightning_probes replay ...`` the command
(:mod:`lightning_probes.replay.cli`). How the probes are driven, and what LCA and the landscape
probe compute between checkpoints, is in :mod:`lightning_probes.replay.driver`.
"""

from __future__ import annotations

from lightning_probes.replay.checkpoints import ReplayCheckpoint, find_checkpoints, load_checkpoint
from lightning_probes.replay.driver import ReplayResult, replay_checkpoints

__all__ = [
    "ReplayCheckpoint",
    "ReplayResult",
    "find_checkpoints",
    "load_checkpoint",
    "replay_checkpoints",
]
