"""What a replay did: the checkpoints, the probes, and LCA's integration error per segment."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.lca import LossContributionCallback
from lightning_probes.replay.checkpoints import ReplayCheckpoint

__all__ = ["ReplayResult", "warn_integration_errors"]


@dataclass
class ReplayResult:
    """What a replay did.

    Attributes:
        checkpoints: The checkpoints replayed, by global step.
        callbacks: The probes (their public state: ``runs``, LCA's ``history``...).
        trainer: The Trainer that carried the loggers (``trainer.loggers``).
    """

    checkpoints: list[ReplayCheckpoint]
    callbacks: list[ProbeCallback]
    trainer: Any = field(repr=False)

    @property
    def steps(self) -> list[int]:
        """The global steps of the checkpoints."""
        return [c.global_step for c in self.checkpoints]

    @property
    def runs(self) -> dict[str, int]:
        """Completed runs per probe (``probe_name``; a failed run warns and is not counted)."""
        return {cb.probe_name: cb.runs for cb in self.callbacks}

    def lca_segments(self) -> list[dict[str, float]]:
        r"""Per checkpoint pair: steps, true loss change, allocated sum, integration error.

        Returns:
            One dict per allocated segment with ``start``, ``end`` (global steps),
            ``delta_loss`` (:math:`L(\theta_{k+1}) - L(\theta_k)` on the LCA set),
            ``sum_lc``, ``error`` (``|delta_loss - sum_lc|``) and ``splits``.
        """
        lca = [cb for cb in self.callbacks if isinstance(cb, LossContributionCallback)]
        if not lca:
            return []
        start_of = {
            b.global_step: a.global_step for a, b in zip(self.checkpoints, self.checkpoints[1:])
        }
        return [
            {
                "start": float(start_of.get(int(row[0]), -1)),
                "end": float(row[0]),
                "delta_loss": float(row[2] - row[1]),
                "sum_lc": float(row[3]),
                "error": float(row[4]),
                "splits": float(row[5]),
            }
            for row in lca[0].history
        ]

    def summary(self) -> str:
        """A short text report: checkpoints, runs per probe, LCA's integration errors."""
        lines = [
            f"replayed {len(self.checkpoints)} checkpoint(s) at global steps {self.steps}",
            "runs: " + ", ".join(f"{k}={v}" for k, v in self.runs.items()),
        ]
        for seg in self.lca_segments():
            lines.append(
                f"lca segment {seg['start']:.0f} -> {seg['end']:.0f}: delta_loss "
                f"{seg['delta_loss']:+.6g}, sum LC {seg['sum_lc']:+.6g}, integration error "
                f"{seg['error']:.3g} ({seg['splits']:.0f} splits)"
            )
        return "\n".join(lines)


def warn_integration_errors(result: ReplayResult) -> None:
    """Warn when an LCA segment's allocation misses its loss change by more than ``tolerance``."""
    tolerance = next(
        (cb.tolerance for cb in result.callbacks if isinstance(cb, LossContributionCallback)), 0.0
    )
    bad = [seg for seg in result.lca_segments() if seg["error"] > tolerance]
    if bad:
        worst = max(bad, key=lambda seg: seg["error"])
        warnings.warn(
            f"LossContributionCallback: on {len(bad)} of {len(result.lca_segments())} checkpoint "
            f"segments the allocated sum misses the loss change by more than tolerance="
            f"{tolerance:g} (worst {worst['error']:.3g} on {worst['start']:.0f} -> "
            f"{worst['end']:.0f}, logged as probes/lca/error): the chords between these "
            "checkpoints are long; pass a larger `max_splits`, or save checkpoints more often.",
            stacklevel=3,
        )
