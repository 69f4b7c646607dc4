"""The checkpoints of a replay: found, loaded safely, ordered by global step, checked.

A ``ModelCheckpoint`` folder holds Lightning checkpoints: dicts with the model's weights under
``"state_dict"`` and the optimizer step they were saved after under ``"global_step"``. Each is
read with ``torch.load(weights_only=True)`` (plain tensors and primitives only: no pickled
object of the file is ever executed) and memory-mapped, so listing a folder of large files
costs little. Two files at the same global step must hold the same weights (``last.ckpt`` next
to ``step=100.ckpt``; one is kept); different weights at one step mean the folder mixes runs,
which is refused rather than replayed as one curve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ReplayCheckpoint", "check_fits", "find_checkpoints", "load_checkpoint"]


@dataclass(frozen=True)
class ReplayCheckpoint:
    """One checkpoint of a replay.

    Attributes:
        path: The file.
        global_step: ``trainer.global_step`` when it was saved (optimizer steps done).
        epoch: The epoch it was saved in (0-based), ``0`` when the file does not say.
    """

    path: Path
    global_step: int
    epoch: int


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``torch.load(weights_only=True)``, on the CPU, mmapped.

    Args:
        path: The ``.ckpt`` file.

    Returns:
        The checkpoint dict (its ``"state_dict"`` a mapping of tensors).

    Raises:
        ValueError: If the file cannot be read with ``weights_only=True`` or is not a Lightning
            checkpoint (no ``state_dict`` of tensors, no integer ``global_step``).
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # unpickling refused, truncated file, not a zip archive ...
        raise ValueError(
            f"Could not read checkpoint {str(path)!r} with `torch.load(weights_only=True)`: "
            f"{type(err).__name__}: {err}. Replay reads only plain tensors and primitives; "
            "pass checkpoints written by Lightning's `ModelCheckpoint` or "
            "`trainer.save_checkpoint`."
        ) from err
    state = ckpt.get("state_dict") if isinstance(ckpt, Mapping) else None
    step = ckpt.get("global_step") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"Expected checkpoint {str(path)!r} to hold the model's weights under "
            f"'state_dict' (a Lightning checkpoint), got keys {_keys(ckpt)}."
        )
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(
            f"Expected checkpoint {str(path)!r} to hold an int 'global_step' >= 0 (a Lightning "
            f"checkpoint), got {step!r}."
        )
    return dict(ckpt)


def find_checkpoints(source: str | Path | Iterable[str | Path]) -> list[ReplayCheckpoint]:
    """The checkpoints of a folder (its ``*.ckpt`` files) or of a list of files, by global step.

    Args:
        source: A ``ModelCheckpoint`` folder (``dirpath``), or checkpoint files.

    Returns:
        One :class:`ReplayCheckpoint` per global step, in increasing step order (of files
        with the same weights at one step, the first by name).

    Raises:
        ValueError: If there is no checkpoint, a file is missing or unreadable (see
            :func:`load_checkpoint`), or two files at one step hold different weights.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        paths = sorted(Path(source).glob("*.ckpt"))
        if not paths:
            raise ValueError(
                f"Expected checkpoints (`*.ckpt` files) in {str(source)!r}, found none. Pass "
                "the `dirpath` of a `ModelCheckpoint` (e.g. lightning_logs/version_0/"
                "checkpoints) or a list of checkpoint files."
            )
    else:
        paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
        if not paths:
            raise ValueError("Expected at least one checkpoint, got an empty list.")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(
            f"Expected checkpoint files or a folder of them, got path(s) that are not files: "
            f"{missing} (a sharded DeepSpeed/FSDP checkpoint is a folder: convert it to one file)."
        )
    by_step: dict[int, tuple[ReplayCheckpoint, dict[str, Any]]] = {}
    for path in sorted(paths, key=lambda p: p.name):
        ckpt = load_checkpoint(path)
        step = ckpt["global_step"]
        epoch = ckpt.get("epoch", 0)
        entry = ReplayCheckpoint(path, step, epoch if isinstance(epoch, int) else 0)
        if step in by_step:
            first, first_ckpt = by_step[step]
            if not _same_weights(first_ckpt["state_dict"], ckpt["state_dict"]):
                raise ValueError(
                    f"Checkpoints {str(first.path)!r} and {str(path)!r} are both at global step "
                    f"{step} but hold different weights: the files come from different runs. "
                    "Replay one run's checkpoints (pass a list of files to choose)."
                )
            continue
        by_step[step] = (entry, ckpt)
    return [by_step[s][0] for s in sorted(by_step)]


def check_fits(model: nn.Module, state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """Raise unless ``state_dict`` has exactly the keys, shapes and dtypes of ``model``'s.

    Args:
        model: The model the weights are loaded into.
        state_dict: A checkpoint's ``"state_dict"``.
        path: The checkpoint, for the message.

    Raises:
        ValueError: Naming the missing and unexpected keys and the mismatched shapes or dtypes
            (e.g. a checkpoint of another model, or of a run in another precision).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    dtypes = [
        f"{k}: checkpoint {v.dtype}, model {own[k].dtype}"
        for k, v in state_dict.items()
        if k in own and v.shape == own[k].shape and v.dtype != own[k].dtype
    ]
    problems = [
        f"{what} {_shown(items)}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
            ("dtype mismatches", dtypes),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"Checkpoint {str(path)!r} does not fit the model {type(model).__name__}: "
            + "; ".join(problems)
            + ". Pass the model class (or an instance built with the hyper-parameters) of the "
            "run that wrote the checkpoints; for a run in another precision convert the model "
            "first (e.g. `model.double()`)."
        )


def _same_weights(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


def _keys(value: Any) -> str:
    return (
        repr(sorted(map(str, value))[:10]) if isinstance(value, Mapping) else type(value).__name__
    )


def _shown(items: list[str]) -> str:
    return repr(items[:8])[:-1] + (f", ... ({len(items)} in all)]" if len(items) > 8 else "]")
