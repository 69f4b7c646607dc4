"""Lightning callbacks: one file per probe, all built on :class:`ProbeCallback`.

Glue only: *when* a probe runs (``schedule``), *on what data* and what probes share
(``shared``: one probe set per trainer and settings, one pre-step weight snapshot), *within
what budget* (``budget``), checks of arguments and environment (``checks``), and the figures of
each probe (``plots/<probe>.py``). The math lives in :mod:`lightning_probes.core` and
:mod:`lightning_probes.functional`.
"""

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.schedule import ProbeSchedule

__all__ = ["ProbeCallback", "ProbeSchedule"]
