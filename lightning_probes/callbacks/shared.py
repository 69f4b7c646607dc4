r"""Work the probes on one Trainer share: one probe set per settings, one pre-step weight copy.

Cockpit's lesson (each quantity declares what it needs, so shared inputs are computed once),
applied to what every probe used to do on its own:

- **Probe sets.** Probes with the same probe-data settings (train loader, ``probe_size``,
  ``seed``, ``batch_to_inputs_targets``; or the same user-given tensors) get one draw and one
  copy on the device. The draw is :func:`~lightning_probes.core.data.draw_probe_set` with those
  settings, so the samples are bit for bit those each probe drew alone; different settings never
  share. Each probe receives its own :class:`~lightning_probes.core.data.ProbeSet` (and input
  containers) around the shared tensors, so replacing its probe set touches no other probe.
- **Pre-step weights.** Probes that need :math:`\theta_t` in ``on_before_optimizer_step``
  (LCA, the landscape's update cosine) get one :class:`WeightSnapshot` per optimizer step. A
  snapshot is read-only for everyone: no probe writes into it. LCA offers the copy of
  :math:`\theta_{t+1}` it keeps for its next step (:meth:`SharedWork.offer`); at that step it
  serves everyone if the weights still equal it (nothing moved them outside the optimizer).

The registry is keyed weakly by the Trainer and holds snapshots only weakly (a snapshot lives as
long as a probe holds it); :func:`release_shared_work` drops the cached probe sets at fit end.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_probes.core.data import ProbeSet, draw_probe_set
from lightning_probes.core.device import tensors_equal
from lightning_probes.core.precision import cast_inputs
from lightning_probes.core.sharding import full_parameters


@dataclass(eq=False)
class WeightSnapshot:
    """A read-only copy of a model's trainable weights, shared by the probes that need it.

    Attributes:
        tensors: ``{parameter name: detached copy}`` (a read-only mapping; never write into the
            tensors: other probes read them).
        step: The optimizer step (``trainer.global_step`` after it) it was verified to
            precede, or ``None`` while it is only offered for the next step.
    """

    tensors: Mapping[str, Tensor]
    step: int | None = None

    @classmethod
    def copy_of(cls, params: Mapping[str, Tensor], step: int | None = None) -> WeightSnapshot:
        """A snapshot holding detached copies of ``params``."""
        return cls(MappingProxyType({k: p.detach().clone() for k, p in params.items()}), step)

    def equals(self, params: Mapping[str, Tensor]) -> bool:
        """Whether it holds exactly ``params`` (same names and values; one host synchronisation)."""
        return tensors_equal(self.tensors, params)


class SharedWork:
    """What the probes on one Trainer share (see the module docstring).

    Attributes:
        draws: Probe sets drawn from the train loader so far.
        device_copies: Probe sets moved to a device so far.
        weight_copies: Pre-step weight copies made so far (offered copies not counted).
    """

    def __init__(self) -> None:
        self.draws = 0
        self.device_copies = 0
        self.weight_copies = 0
        self._sets: dict[Hashable, Any] = {}  # settings -> probe set; (leaves, device) -> copy
        self._latest: weakref.ref[WeightSnapshot] | None = None
        self._offered: weakref.ref[WeightSnapshot] | None = None

    @property
    def num_cached(self) -> int:
        """Probe sets (drawn or moved to a device) cached now; 0 after :meth:`release`."""
        return len(self._sets)

    def drawn_probe_set(self, key: Hashable, draw: Callable[[], ProbeSet]) -> ProbeSet:
        """The probe set drawn for ``key`` (hashable probe-data settings), drawn once."""
        key = ("draw", key)
        if key not in self._sets:
            self._sets[key] = draw()
            self.draws += 1
        return _own(self._sets[key])

    def given_probe_set(self, probe_data: Any, data: ProbeSet) -> ProbeSet:
        """The probe set of the first probe given this ``probe_data`` object (else ``data``).

        Probes given the same object (e.g. one ``Dataset``, collated by each) share the first
        one's tensors, equal to their own.
        """
        key = ("given", id(probe_data))
        if key not in self._sets:  # the entry keeps `probe_data` alive: its id stays unique
            self._sets[key] = (probe_data, data)
        return _own(self._sets[key][1])

    def on_device(
        self, data: ProbeSet, device: torch.device, dtype: torch.dtype | None = None
    ) -> ProbeSet:
        """``data.to(device)``, moved once for every probe holding the same tensors.

        With ``dtype``, floating inputs are also cast to it (the model's
        :func:`~lightning_probes.core.precision.computation_dtype`); targets are not.
        """
        leaves = _leaves(data.inputs) + ([] if data.targets is None else [data.targets])
        key = ("device", tuple(map(id, leaves)), device, dtype)
        entry = self._sets.get(key)
        if entry is None:  # the entry keeps the leaves alive, so their ids stay unique
            moved = data.to(device)
            if dtype is not None:
                moved = ProbeSet(cast_inputs(moved.inputs, dtype), moved.targets)
            entry = self._sets[key] = (leaves, moved)
            self.device_copies += 1
        return _own(entry[1])

    def before_step(self, model: nn.Module, step: int) -> WeightSnapshot:
        """The trainable weights of ``model`` before optimizer step ``step``: one copy per step.

        The first probe to ask at a step gets a fresh copy, or the offered one if the weights
        still equal it; later probes at the same step get the same snapshot.
        """
        latest = None if self._latest is None else self._latest()
        if latest is not None and latest.step == step:
            return latest
        params = full_parameters(model)  # trainable; DTensor shards (FSDP2) gathered whole
        offered = None if self._offered is None else self._offered()
        self._offered = None
        if offered is not None and offered.equals(params):
            offered.step, snapshot = step, offered
        else:
            snapshot = WeightSnapshot.copy_of(params, step)
            self.weight_copies += 1
        self._latest = weakref.ref(snapshot)
        return snapshot

    def offer(self, snapshot: WeightSnapshot) -> None:
        """Offer a copy a probe keeps anyway as the next step's snapshot (held weakly)."""
        self._offered = weakref.ref(snapshot)

    def release(self) -> None:
        """Drop the cached probe sets and snapshots (the counters stay)."""
        self._sets.clear()
        self._latest = self._offered = None


_REGISTRY: weakref.WeakKeyDictionary[Any, SharedWork] = weakref.WeakKeyDictionary()


def shared_work(trainer: Any) -> SharedWork:
    """The :class:`SharedWork` of ``trainer`` (created on first use, dropped with it)."""
    work = _REGISTRY.get(trainer)
    if work is None:
        work = _REGISTRY[trainer] = SharedWork()
    return work


def release_shared_work(trainer: Any) -> None:
    """Release what the probes of ``trainer`` shared (called at the end of fitting)."""
    work = _REGISTRY.get(trainer)
    if work is not None:
        work.release()


def draw_shared_probe_set(
    trainer: Any, probe: Any, size: int, *, seed: int, warn: Callable[[str, str], None]
) -> ProbeSet:
    """The probe set drawn from the train loader of ``trainer``, once per settings.

    The draw is :func:`~lightning_probes.core.data.draw_probe_set` with these settings; every
    probe of ``trainer`` asking with the same settings gets the same samples.

    Args:
        trainer: The Trainer (its ``train_dataloader``; the first of several).
        probe: The probe (its name for messages, its ``batch_to_inputs_targets``).
        size: ``probe_size``.
        seed: Seed of the draw.
        warn: ``warn(tag, message)``, when the training set is smaller than ``size``.

    Raises:
        TypeError: If the train loader is not a ``DataLoader``.
    """
    owner, batch_to_inputs_targets = type(probe).__name__, probe.batch_to_inputs_targets
    loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()))
    elif isinstance(loader, (list, tuple)):
        loader = loader[0]
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise TypeError(
            f"{owner} draws its probe set from the train DataLoader, but got "
            f"{type(loader).__name__}. Pass `probe_data=` explicitly."
        )
    data = shared_work(trainer).drawn_probe_set(
        (loader, size, seed, batch_to_inputs_targets),
        lambda: draw_probe_set(
            loader, size, seed=seed, batch_to_inputs_targets=batch_to_inputs_targets
        ),
    )
    if len(data) < size:
        warn(
            "small-dataset",
            f"{owner}: `probe_size={size}` is larger than the training set; using all "
            f"{len(data)} samples.",
        )
    return data


def _own(data: ProbeSet) -> ProbeSet:
    """A new :class:`ProbeSet` (and input containers) around the same tensors."""
    return ProbeSet(_containers(data.inputs), data.targets)


def _containers(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _containers(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_containers(v) for v in value)
    return value


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
