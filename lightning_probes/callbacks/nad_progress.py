"""The NAD basis at fit start: its predicted time, said before it starts, and its progress.

The basis of :class:`~lightning_probes.callbacks.nad.NADCallback` (``2·d`` forwards of each
of ``num_networks`` fresh networks) can take minutes to hours on large inputs, before the
first training step and before Lightning's progress bar exists. So the fit says first how long
it should take and, when that is long, how to shorten it; then it reports progress as log lines
(``rank_zero_info``, at most one per ``interval`` seconds, with an ETA) rather than a second
progress bar, which would interleave with Lightning's.
"""

from __future__ import annotations

import time
from typing import Any

from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_probes.core.cost import calibrate
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn
from lightning_probes.core.isolation import isolated

LONG_SECONDS = 60.0
"""A predicted basis longer than this is announced with a warning that says how to shorten it."""


def predict_basis(
    model: nn.Module, data: ProbeSet, num_networks: int, output_fn: OutputFn | None = None
) -> float:
    """Predicted seconds of the basis: ``2·d + 1`` single-sample forwards per network.

    Timed on ``model`` itself (the architecture of the random networks) at the probe set's
    batched throughput; the networks' construction is not counted (the user's factory is not
    called here).

    Args:
        model: The trained model (isolated: left as it was).
        data: The probe set (``[n, *input_shape]`` inputs).
        num_networks: Networks of the basis.
        output_fn: Maps the model output to its scalar output (as the callback's).

    Returns:
        Predicted seconds.
    """
    d = int(data.inputs[0].numel())
    with isolated(model, grad=False):
        units = calibrate(model, data, output_fn=output_fn)
    return num_networks * units.seconds(forwards=(2 * d + 1) / max(units.num_samples, 1))


def announce_basis(
    owner: str, predicted: float | None, num_networks: int, shape: tuple[int, ...]
) -> None:
    """Say how long the basis should take; warn, with how to shorten it, when it is long.

    Args:
        owner: The callback's name, to start the message with.
        predicted: Predicted seconds of the basis (``None``: unknown, nothing said).
        num_networks: Networks of the basis.
        shape: The input shape (``d`` is its number of elements).
    """
    if predicted is None:
        return
    d = 1
    for size in shape:
        d *= size
    head = (
        f"{owner}: computing the NAD basis at fit start: {num_networks} networks x 2·d = "
        f"{2 * d} forwards each (input {shape}), predicted {_human(predicted)}"
    )
    if predicted <= LONG_SECONDS:
        rank_zero_info(f"{head}.")
        return
    rank_zero_warn(
        f"{head} ({predicted / num_networks:.2g} s per network) before the first training step. "
        "To shorten it: fewer networks (`num_networks=`, the time is proportional to it; the "
        "leading NADs are stable from a few dozen), a smaller input (`input_shape=` with "
        "downsampled probe inputs: the time grows with d), or `max_overhead=` so the basis is "
        "computed in the first run the budget admits instead of at fit start."
    )


class BasisProgress:
    """``(done, total) -> None`` reporter of the basis: a log line every ``interval`` seconds.

    Args:
        owner: The callback's name, to start each line with.
        interval: Least seconds between two lines (the last network always reports).
    """

    def __init__(self, owner: str, interval: float = 30.0) -> None:
        self.owner = owner
        self.interval = interval
        self.start = time.perf_counter()
        self._last = self.start
        self.lines = 0

    def __call__(self, done: int, total: int, *_: Any) -> None:
        """Report ``done`` of ``total`` networks if ``interval`` has passed (or all are done)."""
        now = time.perf_counter()
        if now - self._last < self.interval and done < total:
            return
        self._last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (total - done)
        self.lines += 1
        rank_zero_info(
            f"{self.owner}: NAD basis {done}/{total} networks, {_human(elapsed)} elapsed, "
            f"ETA {_human(eta)}"
        )


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
