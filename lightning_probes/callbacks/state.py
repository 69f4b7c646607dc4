"""Checkpoint state of a probe: its key, its dict, and a restore that survives a new schedule.

Lightning stores each callback's :meth:`~ProbeState.state_dict` under its ``state_key`` and,
on resume, hands a callback only the entry under its own key. A probe's key includes its
schedule (two probes of a type with different schedules can coexist), so changing
``every_n_steps`` on resume used to drop the state silently: the landscape probe's
initialisation, LCA's cumulative allocation. Every state therefore also records the probe's
*identity*, its configuration without the schedule; :meth:`ProbeState.on_load_checkpoint`
restores the single entry of the same type and identity when the key itself is absent, and
warns about entries of the same type that cannot be restored.

Restored tensors are not trusted blindly either: a probe that keeps per-parameter tensors
(LCA's cumulative allocation, the landscape probe's initial weights) lists them in
:attr:`ProbeState.parameter_states`; their fingerprints are saved beside them and checked on
load (a tensor edited or transposed in the file is refused), and at fit start their names and
shapes are checked against the model's trainable parameters (a missing or reshaped tensor
is refused instead of giving a silently wrong cumulative value).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

SCHEDULE_KEYS = ("every_n_steps", "every_n_epochs", "at_steps", "start_step")


class ProbeState(Callback):
    """State-key, ``state_dict`` and resume logic shared by every probe."""

    parameter_states: ClassVar[tuple[str, ...]] = ()
    """Entries of :meth:`extra_state` that map parameter names to tensors (checked on resume)."""
    schedule: Any
    _runs: int
    _last_step: int

    @property
    def state_key(self) -> str:
        """Unique per probe type and configuration, so two probes of a type can coexist.

        Built once, from the configuration given to the constructor: Lightning reads it at
        every hook call (for its profiler), so it must cost nothing.
        """
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(**self._state_key_config())
        return key

    def _state_key_config(self) -> dict[str, Any]:
        """Configuration that distinguishes two instances of the same probe (override to add)."""
        return {
            "every_n_steps": self.schedule.every_n_steps,
            "every_n_epochs": self.schedule.every_n_epochs,
            "at_steps": self.schedule.at_steps,
            "start_step": self.schedule.start_step,
        }

    def identity(self) -> str:
        """The configuration without the schedule: what the state depends on."""
        config = {k: v for k, v in self._state_key_config().items() if k not in SCHEDULE_KEYS}
        return f"{type(self).__qualname__}{config!r}"

    @override
    def state_dict(self) -> dict[str, Any]:
        extra = self.extra_state()
        prints = {
            name: {k: fingerprint(v) for k, v in extra[name].items()}
            for name in self.parameter_states
            if name in extra
        }
        state = {"runs": self._runs, "last_step": self._last_step, "identity": self.identity()}
        return {**state, **extra, **({"fingerprints": prints} if prints else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        owner = type(self).__name__
        for name, prints in (state_dict.get("fingerprints") or {}).items():
            tensors = state_dict.get(name) or {}
            changed = [
                k
                for k, value in prints.items()
                if k not in tensors or not _close(fingerprint(tensors[k]), value)
            ]
            if changed:
                raise ValueError(
                    f"{owner}: the checkpoint's `{name}` was changed after it was saved "
                    f"({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''}: missing, "
                    "edited or transposed). Resume from an unmodified checkpoint, or remove "
                    f"this probe's entry from `checkpoint['callbacks']` to start it afresh."
                )
        self._restored = {n: state_dict[n] for n in self.parameter_states if state_dict.get(n)}
        self._runs = int(state_dict.get("runs", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self.load_extra_state(state_dict)

    def check_restored_parameters(self, model: nn.Module) -> None:
        """Refuse restored per-parameter tensors that do not fit ``model`` (at fit start).

        Raises:
            ValueError: Naming the missing, unexpected and reshaped parameters.
        """
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        for name, tensors in self.__dict__.pop("_restored", {}).items():
            missing = sorted(set(params) - set(tensors))
            unexpected = sorted(set(tensors) - set(params))
            reshaped = [
                f"{k} {tuple(v.shape)} vs {tuple(params[k].shape)}"
                for k, v in tensors.items()
                if k in params and v.shape != params[k].shape
            ]
            if missing or unexpected or reshaped:
                problems = {"missing": missing, "not in the model": unexpected}
                problems["shaped differently"] = reshaped
                said = "; ".join(f"{k}: {', '.join(v[:5])}" for k, v in problems.items() if v)
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint's `{name}` does not match the "
                    f"model's trainable parameters ({said}). Resume with the model it was "
                    "saved with, or remove this probe's entry from `checkpoint['callbacks']` "
                    "to start it afresh."
                )

    @override
    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning restores it through load_state_dict
        prefix = type(self).__qualname__ + "{"
        same_type = {k: v for k, v in states.items() if str(k).startswith(prefix)}
        same = [v for v in same_type.values() if v.get("identity") == self.identity()]
        if len(same) == 1:
            self.load_state_dict(same[0])
            rank_zero_warn(
                f"{type(self).__name__}: restored its state from the checkpoint although its "
                "schedule changed (the state does not depend on it)."
            )
        elif same_type:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds {len(same_type)} state(s) of this "
                "probe, none restorable: "
                + ("several match this configuration" if same else "their configuration differs")
                + f" ({', '.join(map(str, same_type))}). The probe starts afresh; resume with the "
                "configuration it was saved with to keep its history."
            )

    def extra_state(self) -> dict[str, Any]:
        """Subclass state for checkpoints: tensors and primitives only."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""


def fingerprint(t: Tensor) -> float:
    r"""A position-weighted sum of ``t``'s elements in float64.

    :math:`\sum_i w_i t_i` with :math:`w` evenly spaced in :math:`[1, 2]`: it changes when
    values are edited or moved (a transposed square matrix), unlike a plain sum.
    """
    flat = t.detach().reshape(-1).to(torch.float64)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
    return float((flat * weights).sum())


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-30)
