"""Lightning callbacks: one file per probe, all built on :class:`ProbeCallback`."""

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.schedule import ProbeSchedule

__all__ = ["ProbeCallback", "ProbeSchedule"]
