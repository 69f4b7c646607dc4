r"""Run the probes over saved checkpoints, logging at each checkpoint's global step.

**How.** A real Lightning ``Trainer`` is built (its loggers, strategy, device, rank and
``callback_metrics`` are the ones the probes use live) but its loop is never run. The model
is attached to the Trainer's strategy, and the probes are driven through the very hooks, in
the order, in which ``fit`` calls them: ``setup``, ``on_fit_start`` and ``on_train_start`` at
the first checkpoint's weights; then, for each checkpoint :math:`k` in increasing global step
:math:`s_k`, ``on_before_optimizer_step`` at :math:`(\theta_{k-1}, s_{k-1})` and
``on_train_batch_end`` at :math:`(\theta_k, s_k)`, as if one optimizer step had led from one
checkpoint to the next; finally ``on_train_end`` and ``teardown``. Between hooks the weights
are loaded from the checkpoint and the Trainer's step and epoch counters set to the
checkpoint's (:func:`move_trainer_to`, checked after every move). So every probe computes,
validates, refuses, isolates and logs exactly as live, with the same metric keys, at
``trainer.global_step`` = the checkpoint's step: the same curves appear in the same logger
as if the probes had run live at those steps (a probe that ran live at those steps with the
same probe set and seed gives the same values).

This was chosen over a stand-in object for the Trainer: a stand-in must copy every attribute a
probe reads (loggers, ranks, strategy collectives, callback metrics), and a probe that starts
reading another one would fail, or worse, read a default. The only Lightning internals used
are the progress counters behind ``trainer.global_step`` and ``trainer.current_epoch``, which
Lightning itself restores from checkpoints; a version that keeps them elsewhere is refused.

**What changes in a replay.** Each probe's schedule becomes the checkpoint steps (``at_steps``)
and its ``max_overhead`` ``None`` (no training to stay within). Probes start fresh (one that
already ran is refused): the probe states saved in the checkpoints are not restored, every probe
gets the same fixed probe set (``probe_data``, or its draw from the run's train loader as live),
and the landscape's :math:`\theta_0` is the first checkpoint (save one at step 0,
e.g. ``trainer.save_checkpoint`` in a callback's ``on_train_start``, to measure from the
initialisation; probes never run at step 0, live or replayed, but LCA allocates the segment
from it).

- **LCA** (Lan et al. 2019) allocates, per parameter, the loss change between consecutive
  checkpoints along the straight segment between them,
  :math:`LC_i = \Delta_i \int_0^1 \partial_i L(\theta_k + t\Delta)\,dt`,
  :math:`\Delta = \theta_{k+1} - \theta_k`, with the callback's rule (adaptive Simpson by
  default), logged at :math:`s_{k+1}`. This is a **coarse path integral**: the paper's
  per-step allocation (one segment per optimizer step) becomes one segment per checkpoint
  pair, so per-parameter and per-layer values describe the chord, not the path training took;
  :math:`\sum_i LC_i` still equals :math:`L(\theta_{k+1}) - L(\theta_k)` up to the integration
  error, which is logged (``probes/lca/error``, ``relative_error``, ``splits``) and listed by
  :meth:`ReplayResult.summary`. Long segments may need more ``max_splits``.
- **Landscape**: with ``keep_checkpoints >= 1`` the segment from the previous checkpoint to the
  current one is evaluated (``segment_barrier_lag1``, ``segment_midpoint_loss_lag1`` and the
  segment figure: whether consecutive checkpoints lie in one basin), and the loss planes are
  drawn around each checkpoint. ``update_radial_cosine`` is the cosine of *one optimizer step*,
  so it is logged only where two checkpoints are one step apart, never for a longer chord.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.landscape import LandscapeCallback
from lightning_probes.callbacks.lca import LossContributionCallback
from lightning_probes.callbacks.schedule import ProbeSchedule
from lightning_probes.replay.checkpoints import (
    ReplayCheckpoint,
    check_fits,
    find_checkpoints,
    load_checkpoint,
)
from lightning_probes.replay.result import ReplayResult, warn_integration_errors

__all__ = ["move_trainer_to", "replay_checkpoints"]

Progress = Callable[[int, int, ReplayCheckpoint], None]


def replay_checkpoints(
    model: Any,
    checkpoints: str | Path | Iterable[str | Path],
    callbacks: Sequence[ProbeCallback],
    *,
    probe_data: Any = None,
    train_dataloader: DataLoader | None = None,
    logger: Any = True,
    accelerator: str = "cpu",
    default_root_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> ReplayResult:
    """Run ``callbacks`` at every checkpoint of a run, logging at each one's global step.

    See the module docstring for how the probes are driven and what LCA and the landscape
    probe compute between checkpoints.

    Args:
        model: A ``LightningModule`` instance (its weights are overwritten, checkpoint after
            checkpoint) or class (built with the first checkpoint's ``hyper_parameters``).
            ``pytorch_lightning`` and ``lightning.pytorch`` modules both work.
        checkpoints: A ``ModelCheckpoint`` folder (every ``*.ckpt`` in it) or checkpoint files;
            ordered by global step, whatever their names.
        callbacks: The probes (any of this package's callbacks; their schedule and
            ``max_overhead`` are replaced, see the module docstring).
        probe_data: The fixed probe set of every probe not given its own ``probe_data``:
            a tensor of inputs, ``(inputs, targets)`` or a map-style ``Dataset``.
        train_dataloader: Instead of ``probe_data``: the run's train ``DataLoader``; each probe
            draws its probe set from it as live (``probe_size``, ``seed``), so a replay gets
            the samples the live probes got.
        logger: A Lightning logger, a list of them, or ``True`` (TensorBoard in
            ``default_root_dir``), as for ``Trainer(logger=...)``.
        accelerator: Where the probes run (``"cpu"``, ``"gpu"``, ``"auto"``); one device.
        default_root_dir: The Trainer's root folder (default: the working directory).
        progress: Called as ``progress(index, total, checkpoint)`` before each checkpoint.

    Returns:
        A :class:`ReplayResult`.

    Raises:
        ValueError: If there is no checkpoint, a checkpoint does not fit the model, the folder
            mixes runs, or no probe data is given.
        TypeError: If ``model`` is not a ``LightningModule`` or a callback is not a probe.

    Example:
        >>> from lightning_probes import AblationAUCCallback  # doctest: +SKIP
        >>> result = replay_checkpoints(  # doctest: +SKIP
        ...     MyModule, "lightning_logs/version_0/checkpoints", [AblationAUCCallback()],
        ...     probe_data=(x, y))
        >>> print(result.summary())  # doctest: +SKIP
    """
    callbacks = list(callbacks)
    if not callbacks or not all(isinstance(cb, ProbeCallback) for cb in callbacks):
        got = [type(cb).__name__ for cb in callbacks]
        raise TypeError(f"Expected `callbacks` to be a non-empty list of probes, got {got}.")
    used = [f"{type(cb).__name__} ({cb.runs} runs)" for cb in callbacks if cb.runs]
    if used:  # their state (LCA's cumulative sums, the landscape's θ_0) belongs to another run
        raise ValueError(
            f"Expected new probes, got {', '.join(used)} that ran before: a replay starts every "
            "probe fresh. Pass new instances with the same arguments."
        )
    found = find_checkpoints(checkpoints)
    model, trainer_cls = _build_model(model, found[0])
    for ckpt in found:  # every one fits before anything is logged (memory-mapped: cheap)
        check_fits(model, load_checkpoint(ckpt.path)["state_dict"], ckpt.path)
    _give_probe_data(callbacks, probe_data, train_dataloader)
    _replay_schedules(callbacks, found)
    trainer = trainer_cls(
        accelerator=accelerator,
        devices=1,
        logger=logger,
        max_steps=found[-1].global_step,
        default_root_dir=None if default_root_dir is None else str(default_root_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.replay_train_dataloader = train_dataloader
    trainer.strategy.connect(model)
    try:  # a model fresh from `fit` keeps its Trainer: given back afterwards
        attached = model.trainer
    except RuntimeError:  # "not attached to a `Trainer`"
        attached = None
    model.trainer = trainer
    try:
        _drive(trainer, model, callbacks, found, progress)
    finally:
        model.trainer = attached
    for lg in trainer.loggers:
        lg.finalize("success")
    result = ReplayResult(found, callbacks, trainer)
    warn_integration_errors(result)
    return result


def move_trainer_to(trainer: Any, step: int, epoch: int) -> None:
    """Set ``trainer.global_step`` and ``trainer.current_epoch`` (the fit loop's counters).

    Raises:
        RuntimeError: If the Trainer does not report them back (a Lightning version that
            keeps them elsewhere: refused rather than logging at wrong steps).
    """
    loop = trainer.fit_loop
    loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
    loop.epoch_loop.manual_optimization.optim_step_progress.total.completed = step
    loop.epoch_progress.current.completed = epoch
    if (trainer.global_step, trainer.current_epoch) != (step, epoch):
        raise RuntimeError(
            f"Could not move the Trainer to global step {step}, epoch {epoch} (it reports "
            f"{trainer.global_step}, {trainer.current_epoch}): this Lightning version keeps its "
            "progress counters elsewhere. Please report it with your Lightning version."
        )


def _drive(
    trainer: Any,
    model: Any,
    callbacks: list[ProbeCallback],
    found: list[ReplayCheckpoint],
    progress: Progress | None,
) -> None:
    """Call the probes' hooks in ``fit``'s order, checkpoint after checkpoint."""
    trainer.strategy.setup_environment()
    trainer.strategy.model_to_device()
    _load_weights(model, found[0])
    move_trainer_to(trainer, 0, found[0].epoch)  # fit starts at step 0: probes run after it
    trainer.training = True
    model.train()
    for cb in callbacks:
        cb.setup(trainer, model, "fit")
    try:
        for hook in ("on_fit_start", "on_train_start"):
            for cb in callbacks:
                getattr(cb, hook)(trainer, model)
        previous: ReplayCheckpoint | None = None
        for index, ckpt in enumerate(found):
            if progress is not None:
                progress(index, len(found), ckpt)
            if previous is not None:  # θ_{k-1} is loaded: the "optimizer step" to θ_k
                move_trainer_to(trainer, previous.global_step, previous.epoch)
                for cb in callbacks:
                    cb.on_before_optimizer_step(trainer, model, None)  # type: ignore[arg-type]
            if index > 0:
                _load_weights(model, ckpt)
            move_trainer_to(trainer, ckpt.global_step, ckpt.epoch)
            for cb in callbacks:
                cb.on_train_batch_end(trainer, model, None, None, 0)
            previous = ckpt
        for cb in callbacks:
            cb.on_train_end(trainer, model)
    finally:
        for cb in callbacks:
            cb.teardown(trainer, model, "fit")


def _load_weights(model: Any, ckpt: ReplayCheckpoint) -> None:
    model.load_state_dict(load_checkpoint(ckpt.path)["state_dict"], strict=True)


def _build_model(model: Any, first: ReplayCheckpoint) -> tuple[Any, type]:
    """The model (a class is built with ``first``'s hyper-parameters) and its Trainer class."""
    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        try:
            lightning = importlib.import_module(namespace)
        except ImportError:
            continue
        base = lightning.LightningModule
        if isinstance(model, type) and issubclass(model, base):
            hparams = load_checkpoint(first.path).get("hyper_parameters") or {}
            hparams = dict(hparams) if isinstance(hparams, Mapping) else {}
            try:
                model = model(**hparams)
            except TypeError as err:
                raise TypeError(
                    f"Could not build {model.__name__} from the hyper-parameters saved in "
                    f"{str(first.path)!r} ({sorted(hparams)}): {err}. Pass a model instance."
                ) from err
        if isinstance(model, base):
            return model, _replay_trainer_class(lightning.Trainer)
    raise TypeError(
        "Expected `model` to be a LightningModule instance or class, got "
        f"{model!r}. Wrap a plain nn.Module in a LightningModule whose state_dict matches "
        "the checkpoints."
    )


def _replay_trainer_class(base: type) -> type:
    """``base`` whose ``train_dataloader`` is the replay's (probes draw probe sets from it)."""

    def train_dataloader(self: Any) -> Any:
        return self.replay_train_dataloader

    return type(
        f"Replay{base.__name__}",
        (base,),
        {"train_dataloader": property(train_dataloader), "replay_train_dataloader": None},
    )


def _give_probe_data(
    callbacks: list[ProbeCallback], probe_data: Any, train_dataloader: DataLoader | None
) -> None:
    if probe_data is not None and train_dataloader is not None:
        raise ValueError("Expected one of `probe_data` and `train_dataloader`, got both.")
    if train_dataloader is not None and not isinstance(train_dataloader, DataLoader):
        raise TypeError(
            "Expected `train_dataloader` to be a DataLoader, got "
            f"{type(train_dataloader).__name__}."
        )
    need = [cb for cb in callbacks if cb.probe_data is None]
    if need and probe_data is None and train_dataloader is None:
        names = sorted({type(cb).__name__ for cb in need})
        raise ValueError(
            f"{', '.join(names)} need(s) a probe set: pass `probe_data=` (tensors or a "
            "Dataset: one fixed probe set for every probe) or `train_dataloader=` (the run's "
            "loader: each probe draws its samples from it as it did live)."
        )
    if probe_data is not None:
        for cb in need:
            cb.use_probe_data(probe_data)


def _replay_schedules(callbacks: list[ProbeCallback], found: list[ReplayCheckpoint]) -> None:
    """Each probe runs at every checkpoint step (LCA: on every segment); no budget."""
    probed = [c.global_step for c in found if c.global_step >= 1]
    segments = [c.global_step + 1 for c in found[:-1]]  # "optimizer steps" leaving a checkpoint
    for cb in callbacks:
        steps = segments if isinstance(cb, LossContributionCallback) else probed
        if not steps:
            what = "two checkpoints" if steps is segments else "a checkpoint after step 0"
            raise ValueError(
                f"{type(cb).__name__} needs {what} to replay, got checkpoints at global steps "
                f"{[c.global_step for c in found]}."
            )
        cb.schedule = ProbeSchedule.create(None, None, steps, 0, {})
        cb.max_overhead = None
        if isinstance(cb, LandscapeCallback) and cb.keep_checkpoints == 0:
            warnings.warn(
                "LandscapeCallback(keep_checkpoints=0) evaluates no segment between "
                "checkpoints in a replay; pass `keep_checkpoints=1` to get them.",
                stacklevel=3,
            )
