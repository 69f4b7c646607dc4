"""Validators the callbacks share, with Lightning-style messages that name the argument.

Every check raises at once in ``__init__`` (as Lightning's own callbacks do) with
"Expected `arg` to be ..., got ..." or "`arg` can be ..., got ...". Also the finiteness check
of a probe's run (:func:`all_finite`, :class:`NonFiniteValueError`).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.callbacks.memory import is_out_of_memory, out_of_memory_message
from lightning_probes.core.data import ProbeSet, tensors_of


class NonFiniteValueError(ArithmeticError):
    """A probe met NaN/inf (in the weights or in a value it computed); the run is skipped."""


def is_int_at_least(value: Any, low: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) ``>= low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_positive_int(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 ("Expected `name` to be a ...").

    Example:
        >>> check_positive_int("window", 0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `window` to be a positive int, got 0.
    """
    if not is_int_at_least(value, 1):
        raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")


def check_int_at_least(name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int ``>= low`` (bools refused)."""
    if not is_int_at_least(value, low):
        raise ValueError(f"Expected `{name}` to be an int >= {low}, got {value!r}.")


def check_optional_int(name: str, value: Any, low: int, low_text: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or an int ``>= low``.

    Args:
        name: The argument's name.
        value: Its value.
        low: The smallest allowed int.
        low_text: How the message names ``low`` (e.g. another argument), default ``low``.
    """
    if value is not None and (not isinstance(value, int) or value < low):
        raise ValueError(
            f"Expected `{name}` to be None or an int >= {low_text or low}, got {value!r}."
        )


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed`` ("`name` can be 'a' or 'b'").

    Example:
        >>> check_choice("value", "one", ("zero", "mean"))
        Traceback (most recent call last):
        ...
        ValueError: `value` can be 'zero' or 'mean', got 'one'.
    """
    if value not in allowed:
        names = [repr(a) for a in allowed]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"`{name}` can be {listed}, got {value!r}.")


def check_callable(name: str, value: Any, signature: str) -> None:
    """Raise ``TypeError`` unless ``value`` is ``None`` or a callable ``signature``."""
    if value is not None and not callable(value):
        raise TypeError(
            f"Expected `{name}` to be a callable {signature}, got {type(value).__name__}."
        )


def check_chunk_size(chunk_size: Any) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is ``None`` or a positive int."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be a positive int or None, got {chunk_size!r}.")


def check_max_overhead(max_overhead: Any) -> None:
    """Raise ``ValueError`` unless ``max_overhead`` is ``None`` or a number > 0."""
    if max_overhead is not None and (
        isinstance(max_overhead, bool)
        or not isinstance(max_overhead, (int, float))
        or not max_overhead > 0
    ):
        raise ValueError(
            f"Expected `max_overhead` to be a fraction > 0 or None, got {max_overhead!r}."
        )


def check_loggers(trainer: Any, owner: str) -> str | None:
    """Check at ``setup`` that ``trainer`` has a logger; a warning for artefacts none takes.

    Scalars go to every logger; histograms to TensorBoard and W&B; images and figures also
    to MLflow and CSV (:mod:`lightning_probes.logging.sinks`); any other logger takes
    scalars only.

    Args:
        trainer: The Trainer.
        owner: The probe's class name, for the messages.

    Returns:
        A warning to show once, naming what no logger of the Trainer takes, or ``None``.

    Raises:
        ValueError: If the Trainer has no logger (``logger=False``).
    """
    if not trainer.loggers:
        raise ValueError(
            f"{owner} needs a logger to report to, but the Trainer has "
            "`logger=False`. Pass `logger=True` (TensorBoard) or a logger instance."
        )
    kinds = set().union(*(s.kinds for s in map(plog.sink_for, trainer.loggers) if s))
    names = ", ".join(type(logger).__name__ for logger in trainer.loggers)
    if "image" not in kinds:
        return (
            f"{owner}: the Trainer's loggers ({names}) take scalars only, so "
            "histograms, images and figures are not logged. TensorBoardLogger and WandbLogger "
            "take all of them; MLFlowLogger and CSVLogger (a folder of PNG files) take images "
            "and figures."
        )
    if "histogram" not in kinds:
        takers = " and ".join(plog.TAKERS["histogram"])
        return (
            f"{owner}: histograms are not logged: only {takers} take them, and the "
            f"Trainer's loggers are {names}. Scalars, images and figures are logged."
        )
    return None


def check_probe_targets(probe: Any, data: ProbeSet) -> None:
    """Raise ``ValueError`` when a probe's targets are missing or not class labels.

    Args:
        probe: The probe: its name for the message, and its ``needs_targets`` and
            ``needs_class_targets`` (integer class labels: accuracy, class means).
        data: The probe set.
    """
    owner = type(probe).__name__
    needs_targets, needs_class_targets = probe.needs_targets, probe.needs_class_targets
    if needs_targets and data.targets is None:
        raise ValueError(
            f"{owner} needs targets, but the probe batches have none. Pass "
            "`probe_data=(inputs, targets)` or `batch_to_inputs_targets=`."
        )
    targets = data.targets
    if needs_class_targets and targets is not None and torch.is_floating_point(targets):
        raise ValueError(
            f"{owner} needs class labels (integer targets of shape [n]), but "
            f"the probe targets are {targets.dtype} of shape {tuple(targets.shape)}. It "
            "measures accuracy or class-conditional statistics and does not apply to "
            "regression; pass integer labels via `probe_data=` or `batch_to_inputs_targets=`."
        )
    bad = nonfinite_samples(data)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{owner}: {len(bad)} probe sample(s) hold NaN or infinite inputs or targets "
            f"(indices {shown} of the probe set). Every probe value would be contaminated by "
            "them (an ablation curve's accuracy, a kernel's eigenvalues); pass `probe_data=` "
            "without them, or clean the training data."
        )


def nonfinite_samples(data: ProbeSet) -> list[int]:
    """Indices of probe samples whose floating-point inputs or targets are not all finite."""
    flags: Tensor | None = None
    for t in [*tensors_of(data.inputs), *tensors_of(data.targets)]:
        if t.is_floating_point() and t.ndim > 0:
            row = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
            flags = row if flags is None else flags | row.to(flags.device)
    return [] if flags is None else flags.nonzero().flatten().tolist()


def finite_flags(metrics: Mapping[str, float | Tensor]) -> dict[str, bool]:
    """Whether each value is finite (every element), with one host synchronisation at most.

    Example:
        >>> finite_flags({"a": 1.0, "b": torch.tensor([1.0, float("nan")])})
        {'a': True, 'b': False}
    """
    tensors = {k: v for k, v in metrics.items() if isinstance(v, Tensor)}
    finite = {k: math.isfinite(v) for k, v in metrics.items() if not isinstance(v, Tensor)}
    if tensors:  # one synchronisation for all tensor values (they may be on a GPU)
        flags = [torch.isfinite(v.detach()).all() for v in tensors.values()]
        device = flags[0].device
        finite.update(zip(tensors, torch.stack([f.to(device) for f in flags]).tolist()))
    return {k: bool(finite[k]) for k in metrics}


def check_finite_metrics(metrics: Mapping[str, float | Tensor]) -> None:
    """Raise :class:`NonFiniteValueError` naming every metric that is NaN or infinite."""
    bad = [k for k, ok in finite_flags(metrics).items() if not ok]
    if bad:
        raise NonFiniteValueError(f"non-finite values for {', '.join(bad)}")


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with a single host synchronisation.

    Example:
        >>> all_finite([torch.ones(2), torch.tensor([1.0, float("inf")])])
        False
    """
    flags = [torch.isfinite(t).all() for t in tensors]
    if not flags:
        return True
    device = flags[0].device  # parameters may live on several devices (model parallel)
    return bool(torch.stack([f.to(device) for f in flags]).all())


def failure_warning(owner: str, step: int, err: Exception, probe: Any) -> tuple[str, str]:
    """``(tag, message)`` of the warning for a probe run that failed with ``err``.

    Args:
        owner: The probe's class name.
        step: The global step of the run.
        err: What the run raised.
        probe: The probe (its ``on_error``: ``"raise"`` re-raises as ``RuntimeError``).

    Raises:
        RuntimeError: With ``on_error="raise"``, for any error but :class:`NonFiniteValueError`.
    """
    if isinstance(err, NonFiniteValueError):
        return "non-finite", (
            f"{owner} skipped its run at step {step}: {err} "
            "(NaN/inf). Training continues; later runs are attempted as scheduled, and this "
            "warning is shown once."
        )
    if is_out_of_memory(err) and probe.on_error != "raise":
        lead = f"{owner} failed at step {step} and was skipped: it ran out of memory"
        return "oom-run", out_of_memory_message(lead, err, None) + (
            "\nThe memory was freed; the model is unchanged and training continues. Later "
            "runs are attempted (pass a smaller `probe_size`; this warning is shown once)."
        )
    message = (
        f"{owner} failed at step {step} and was skipped; "
        f"the model is unchanged and training continues. {type(err).__name__}: {err}"
    )
    if probe.on_error == "raise":
        raise RuntimeError(message) from err
    return f"error-{type(err).__name__}", (
        message + "\n" + "".join(traceback.format_exception(err)[-3:])
    )
