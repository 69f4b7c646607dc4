"""Out-of-memory handling for probe work: free, retry smaller, or skip with the numbers.

A probe must never end the training it observes. Every piece of probe work (fit-start
preparation, per-step weight copies, scheduled runs) runs under these helpers:

- :func:`is_out_of_memory` recognises the allocators' errors (``torch.OutOfMemoryError`` on
  CUDA, ``DefaultCPUAllocator: can't allocate memory`` on CPU, MPS, ``MemoryError``);
- :func:`needed_bytes` reads the request size the allocator reported;
- :func:`release_memory` drops the failed attempt's tensors from the caching allocator;
- :func:`shrink_chunks` halves a probe's chunk setting (``chunk_size`` or ``memory_budget``),
  so a scheduled run is retried with smaller chunks before it is skipped;
- :func:`out_of_memory_message` states what ran out, how much it asked for, what was free and
  what to pass to make it fit.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from typing import Any

import torch

from lightning_probes.callbacks.shared import WeightSnapshot, shared_work

__all__ = [
    "CHUNK_SETTINGS",
    "MAX_RETRIES",
    "ProbeOutOfMemoryError",
    "format_bytes",
    "is_out_of_memory",
    "needed_bytes",
    "off_on_another_rank",
    "out_of_memory_in",
    "out_of_memory_message",
    "prepare_or_out_of_memory",
    "release_memory",
    "run_retrying",
    "shrink_chunks",
    "weights_before_step",
]

#: The settings that bound a probe's peak memory, tried in this order: samples per pass
#: (``chunk_size``; ``None`` is the whole probe set) or bytes of activations per pass.
CHUNK_SETTINGS = ("chunk_size", "memory_budget")
#: Halvings tried per run before it is skipped (chunks down to 1/64 of the setting).
MAX_RETRIES = 6

_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")
_BYTES = re.compile(r"allocate (\d+) bytes")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZED = re.compile(r"(?:Tried to allocate|allocate) ([\d.]+) ?(B|KiB|MiB|GiB|TiB)")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocator's out-of-memory error (any device)."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError | ProbeOutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _MARKERS)


def needed_bytes(err: BaseException) -> int | None:
    """The size of the failed allocation as the allocator reported it (``None``: not stated)."""
    text = str(err)
    match = _BYTES.search(text)
    if match is not None:
        return int(match.group(1))
    match = _SIZED.search(text)
    if match is not None:
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, e.g. ``"1.50 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def release_memory(device: torch.device | None = None) -> None:
    """Collect the failed attempt's garbage and return cached blocks to the device.

    Args:
        device: The model's device; on CUDA the caching allocator's free blocks are released.
    """
    gc.collect()
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def shrink_chunks(probe: Any, samples: int) -> str | None:
    """Halve the probe's chunk setting; the setting's new value as ``"name=value"``.

    Args:
        probe: A probe with a ``chunk_size`` (samples per pass, ``None``: all ``samples``) or
            ``memory_budget`` (bytes per pass) attribute.
        samples: Size of the probe set (what ``chunk_size=None`` means).

    Returns:
        ``"chunk_size=32"`` (say) once halved, or ``None`` when there is nothing to halve
        (no such setting, or already one sample / 1 KiB per pass).
    """
    name = _chunk_setting(probe)
    if name is None:
        return None
    value = getattr(probe, name)
    if name == "chunk_size":
        current = samples if value is None else min(int(value), samples)
        if current <= 1:
            return None
        setattr(probe, name, current // 2)
    else:
        if value is None or int(value) <= 1024:
            return None
        setattr(probe, name, int(value) // 2)
    return _setting(probe)


def _chunk_setting(probe: Any) -> str | None:
    """The name of the probe's chunk setting, the first of :data:`CHUNK_SETTINGS` it has."""
    return next((name for name in CHUNK_SETTINGS if hasattr(probe, name)), None)


def _setting(probe: Any) -> str | None:
    name = _chunk_setting(probe)
    return None if name is None else f"{name}={getattr(probe, name)}"


class ProbeOutOfMemoryError(RuntimeError):
    """A probe's work ran out of memory; raised after the memory was freed.

    It carries the allocator's report as text (``needed``, ``report``), not the original
    exception, whose traceback would keep the failed attempt's tensors alive.
    """

    def __init__(self, report: str, needed: int | None, setting: str | None) -> None:
        self.report, self.needed, self.setting = report, needed, setting
        asked = "" if needed is None else f"an allocation of {format_bytes(needed)}; "
        tried = "" if setting is None else f", even with `{setting}`"
        super().__init__(f"out of memory ({asked}{report}){tried}")


def out_of_memory_message(lead: str, err: BaseException, device: torch.device | None) -> str:
    """``lead`` followed by the size of the failed allocation and the device's free memory.

    Args:
        lead: The start of the message, e.g. ``"NADCallback ran out of memory at fit start"``.
        err: The allocator's error (or a :class:`ProbeOutOfMemoryError`).
        device: The model's device (its free memory is stated on CUDA).
    """
    needed = err.needed if isinstance(err, ProbeOutOfMemoryError) else needed_bytes(err)
    parts = [] if needed is None else [f"an allocation of {format_bytes(needed)}"]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        parts.append(f"{format_bytes(free)} of {format_bytes(total)} free on {device}")
    detail = f" ({'; '.join(parts)})" if parts else ""
    report = err.report if isinstance(err, ProbeOutOfMemoryError) else str(err)
    return f"{lead}{detail}. {type(err).__name__}: {report.splitlines()[0][:300]}"


def run_retrying(
    run: Callable[[], None],
    probe: Any,
    samples: int,
    device: torch.device | None,
    warn: Callable[[str, str], None],
) -> None:
    """Call ``run``; after an out-of-memory error, free, halve the chunks and call it again.

    The memory is freed outside the ``except`` block, once the failed attempt's frames are
    gone, so a retry really has the memory the failed attempt held.

    Args:
        run: One attempt of the probe's work (it must leave no partial state behind an OOM).
        probe: The probe, whose chunk setting (:data:`CHUNK_SETTINGS`) is halved per retry
            and stays halved for later runs.
        samples: Size of the probe set.
        device: The model's device.
        warn: ``warn(tag, message)``: once the run fits, which setting it needed.

    Raises:
        ProbeOutOfMemoryError: When even the smallest chunks tried do not fit (the setting
            is then restored).
        Exception: What ``run`` raised, when it is not an OOM.
    """
    first: str | None = None
    name = _chunk_setting(probe)
    original = None if name is None else getattr(probe, name)
    for retry in range(MAX_RETRIES + 1):
        try:
            run()
            break
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            report, needed = str(err).splitlines()[0][:300], needed_bytes(err)
            lead = f"{type(probe).__name__} ran out of memory in a run"
            first = first or out_of_memory_message(lead, err, device)
        release_memory(device)
        if retry == MAX_RETRIES or shrink_chunks(probe, samples) is None:
            tried = _setting(probe)
            if name is not None:  # smaller chunks did not help: undone
                setattr(probe, name, original)
            raise ProbeOutOfMemoryError(report, needed, tried)
    if first is not None:
        warn(
            f"oom-retried-{_setting(probe)}",
            f"{first}\nThe memory was freed and the run retried with `{_setting(probe)}`, "
            "which fits and is kept for later runs (pass it to the probe to start there).",
        )


def weights_before_step(
    trainer: Any, model: torch.nn.Module, step: int, probe: Any, warn: Callable[[str, str], None]
) -> WeightSnapshot | None:
    """The shared pre-step weight copy, or ``None`` (warned) when it does not fit in memory.

    Args:
        trainer: The Trainer (its :class:`~lightning_probes.callbacks.shared.SharedWork`).
        model: The model.
        step: The optimizer step about to complete.
        probe: The probe asking (its name; ``on_error="raise"`` re-raises).
        warn: ``warn(tag, message)``.

    Raises:
        Exception: Errors other than an OOM, and an OOM under ``on_error="raise"``.
    """
    device = next(iter(model.parameters())).device
    copied: list[WeightSnapshot] = []
    failed = out_of_memory_in(
        lambda: copied.append(shared_work(trainer).before_step(model, step)),
        probe,
        device,
        f"copying the weights before step {step}",
    )
    if failed is None:
        return copied[0]
    warn(
        "oom-weights",
        failed + "\nThe memory was freed and training continues; the probe "
        "skips the steps whose copy does not fit (this warning is shown once).",
    )
    return None


def out_of_memory_in(
    work: Callable[[], object], probe: Any, device: torch.device | None, where: str
) -> str | None:
    """Run ``work``: ``None``, or, after an OOM, the memory freed and the message to give.

    Args:
        work: The probe's work.
        probe: The probe (its name; ``on_error="raise"`` re-raises).
        device: The model's device.
        where: What ran out, e.g. ``"in its fit-start work"``.

    Raises:
        Exception: Errors other than an OOM, and an OOM under ``on_error="raise"``.
    """
    try:
        work()
        return None
    except Exception as err:
        if not is_out_of_memory(err) or probe.on_error == "raise":
            raise
        lead = f"{type(probe).__name__} ran out of memory {where}"
        message = out_of_memory_message(lead, err, device)
    release_memory(device)  # outside the except block: the failed frames are gone
    return message


def prepare_or_out_of_memory(
    prepare: Callable[[], None], probe: Any, device: torch.device | None
) -> str | None:
    """Run a probe's fit-start work; the warning to give if it ran out of memory, else ``None``.

    Args:
        prepare: The fit-start work (probe set, validation, e.g. the NAD basis).
        probe: The probe (its name; ``on_error="raise"`` re-raises).
        device: The model's device.

    Raises:
        Exception: Errors other than an OOM (configuration errors stop ``fit``), and an OOM
            under ``on_error="raise"``.
    """
    failed = out_of_memory_in(prepare, probe, device, "in its fit-start work")
    return (
        None
        if failed is None
        else failed
        + (
            "\nThe memory was freed and training continues; the probe is off for this fit "
            "(pass a smaller `probe_size`, or a smaller chunk setting where the probe has one)."
        )
    )


def off_on_another_rank(probe: Any) -> str:
    """The warning of a rank whose probe is off because another rank ran out of memory."""
    return f"{type(probe).__name__} is off: another rank ran out of memory at fit start"
