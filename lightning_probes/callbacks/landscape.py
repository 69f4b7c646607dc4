r"""``LandscapeCallback``: the large-scale geometry of the loss landscape along training.

Fort & Jastrzebski, "Large Scale Structure of Neural Network Loss Landscapes" (NeurIPS 2019)
model the low-loss set as n-wedges radiating from the origin: training moves mostly
radially (the weight norm :math:`r` grows), every random 2-D cut around the current point
shows a convex depression (a "radial tunnel"), few directions are short (high curvature),
and checkpoints that lie on different wedges cannot be averaged. This callback logs the
measurements that test this picture on a real run; the math lives in
:mod:`lightning_probes.core.landscape.planes`, :mod:`lightning_probes.core.landscape.hessian` and
:mod:`lightning_probes.functional.landscape`, the figures in
:mod:`lightning_probes.callbacks.plots.landscape`. The weights before a probed step are the
Trainer's shared read-only snapshot (:mod:`lightning_probes.callbacks.shared`): LCA reads the
same copy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.checks import (
    check_choice,
    check_int_at_least,
    check_optional_int,
)
from lightning_probes.callbacks.memory import weights_before_step
from lightning_probes.callbacks.plots.landscape import log_plane, log_segments
from lightning_probes.callbacks.shared import WeightSnapshot
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import LossFn, OutputFn, probe_loss
from lightning_probes.core.landscape.geometry import (
    PlaneKind,
    plane_directions,
    short_direction_threshold,
)
from lightning_probes.core.landscape.hessian import count_short_directions, hessian_top_eigenvalues
from lightning_probes.core.landscape.planes import (
    flatten,
    loss_along_path,
    loss_plane,
    trainable_parameters,
)
from lightning_probes.core.layers import check_layer_spec, select_layers
from lightning_probes.core.precision import trained_parameters
from lightning_probes.functional.landscape import (
    OneDimPolicy,
    drift_from_init,
    interpolation_barrier,
    update_radial_cosine,
)


class LandscapeCallback(ProbeCallback):
    r"""Radius, drift from initialisation, radial share of updates, loss planes, short directions.

    At every run (default every 50 optimizer steps) it logs under ``probes/landscape/``:

    - ``radius`` and ``<layer>/radius``: :math:`r = \|\theta\|` (model, and each layer's own
      parameters).
    - ``distance_from_init``, ``angle_from_init`` (degrees), model and per layer:
      :math:`\|\theta - \theta_0\|` and :math:`\angle(\theta, \theta_0)`. :math:`\theta_0`
      is copied when fitting first starts and kept in the checkpoint, so a resumed run
      measures from the same origin.
    - ``init_radial_cosine``: :math:`\cos(\theta - \theta_0, \theta_0)`, the radial share of
      the whole displacement since initialisation.
    - ``update_radial_cosine`` (model and per layer): :math:`\cos(\Delta\theta, \theta)` of the
      single optimizer step that ends at the probed step, :math:`\Delta\theta` and
      :math:`\theta` captured just before that optimizer step (step-based schedules only;
      positive: the step moved outwards). Only the scheduled steps are captured (one copy of
      the weights, freed after the run).
    - ``loss``: the probe-set loss at the current weights.
    - every ``plane_every_n_runs`` runs, for each of ``planes``: a TensorBoard image
      (``plane_<kind>``, log-loss, :math:`\beta` upwards) and a contour figure
      (``plane_<kind>_contour``) of :math:`L(\theta + a u + b v)` on a
      ``plane_resolution``:sup:`2` grid over :math:`[-s, s]^2`, ``s = plane_span``.
      ``"radial"``: :math:`u = \theta` (so :math:`a = -1` is the origin) and :math:`v` a
      filter-normalised random direction made orthogonal to :math:`\theta`; ``"random"``: two
      filter-normalised random directions (Li et al. 2018). Fresh directions at every run,
      seeded by ``seed`` and the run index.
    - with ``hessian_top_k`` (**costly**: about ``2k + 20`` Hessian-vector products over the
      probe set): ``hessian_max_eigenvalue`` and ``short_directions``, the number of the
      top-k eigenvalues above ``hessian_threshold`` (relative to the largest by default).
    - with ``keep_checkpoints = K > 0``: the weights of every ``checkpoint_every_n_runs``-th
      run are kept in memory (the last ``K``, also saved in the checkpoint) and the loss along
      the segment from each to the current weights is evaluated: ``segment_barrier_lag<j>``
      (loss above the chord) and ``segment_midpoint_loss_lag<j>`` (the loss of the average
      of the two weight sets, what SWA would give), ``j = 1`` the most recent, plus a figure.

    Memory: one copy of the weights for :math:`\theta_0` (also written to checkpoints), one
    transient copy at each probed step for the update cosine (the Trainer's shared pre-step
    snapshot: none of its own when LCA instruments that step), and ``keep_checkpoints`` copies
    (also written to checkpoints).

    Args:
        layers: Layer names/globs for the per-layer values (default: every module owning
            parameters).
        plane_every_n_runs: Draw the planes at runs ``0, n, 2n, ...`` (the first run
            included; ``0``: never). Each plane costs ``plane_resolution**2`` probe-set
            losses (batched, see :func:`~lightning_probes.core.landscape.batched_probe_loss`).
        plane_resolution: Grid points per axis.
        plane_span: Half-width of the grid, in units of the directions.
        planes: Which planes to draw.
        one_dim: Random directions for 1-D parameters: ``"zero"`` (biases and norm scales
            stay put, Li et al.'s ``ignore='biasbn'``), ``"weights"``, or ``"norm"``.
        hessian_top_k: Number of top Hessian eigenvalues (``None``: off).
        hessian_threshold: Eigenvalues above it count as short directions.
        hessian_threshold_mode: ``"relative"`` (times the largest eigenvalue) or
            ``"absolute"``.
        hessian_iters: Lanczos steps (default ``2k + 20``, at least 40, at most the dimension).
        keep_checkpoints: Number of earlier weight sets kept for segment losses.
        checkpoint_every_n_runs: Keep the weights of every n-th run.
        segment_points: Points per segment, ends included.
        loss_fn: ``(outputs, targets) -> mean loss`` (default cross-entropy / MSE).
        output_fn: Model output to logits.
        chunk_size: Samples per forward pass on the probe set.
        **kwargs: :class:`~lightning_probes.callbacks.base.ProbeCallback` arguments
            (schedule, probe data, ``probe_size=256``, ``seed``...).

    Example:
        >>> cb = LandscapeCallback(every_n_steps=100, plane_every_n_runs=3)
    """

    probe_name = "landscape"
    needs_grad = False
    needs_targets = True
    evaluates_loss = True
    parameter_states = ("init",)
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 50}

    def __init__(
        self,
        *,
        layers: str | Sequence[str] | None = None,
        plane_every_n_runs: int = 1,
        plane_resolution: int = 11,
        plane_span: float = 1.0,
        planes: Sequence[PlaneKind] = ("radial", "random"),
        one_dim: OneDimPolicy = "zero",
        hessian_top_k: int | None = None,
        hessian_threshold: float = 0.1,
        hessian_threshold_mode: Literal["relative", "absolute"] = "relative",
        hessian_iters: int | None = None,
        keep_checkpoints: int = 0,
        checkpoint_every_n_runs: int = 1,
        segment_points: int = 11,
        loss_fn: LossFn | None = None,
        output_fn: OutputFn | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_layer_spec(layers)
        check_int_at_least("plane_every_n_runs", plane_every_n_runs, 0)
        check_int_at_least("keep_checkpoints", keep_checkpoints, 0)
        check_int_at_least("plane_resolution", plane_resolution, 2)
        if not plane_span > 0:
            raise ValueError(f"Expected `plane_span` to be > 0, got {plane_span!r}.")
        planes = tuple(planes)
        if not set(planes) <= {"radial", "random"}:
            raise ValueError(f"`planes` can contain 'radial' and 'random', got {planes!r}.")
        check_choice("one_dim", one_dim, ("zero", "weights", "norm"))
        check_optional_int("hessian_top_k", hessian_top_k, 1)
        check_optional_int("hessian_iters", hessian_iters, hessian_top_k or 1, "`hessian_top_k`")
        check_choice("hessian_threshold_mode", hessian_threshold_mode, ("relative", "absolute"))
        if not isinstance(checkpoint_every_n_runs, int) or checkpoint_every_n_runs < 1:
            raise ValueError(
                "Expected `checkpoint_every_n_runs` to be an int >= 1, got "
                f"{checkpoint_every_n_runs!r}."
            )
        if not isinstance(segment_points, int) or segment_points < 3 or segment_points % 2 == 0:
            raise ValueError(
                f"Expected `segment_points` to be an odd int >= 3, got {segment_points!r}."
            )
        self.layers = layers
        self.plane_every_n_runs = plane_every_n_runs
        self.plane_resolution = plane_resolution
        self.plane_span = float(plane_span)
        self.planes = planes
        self.one_dim = one_dim
        self.hessian_top_k = hessian_top_k
        self.hessian_threshold = float(hessian_threshold)
        self.hessian_threshold_mode = hessian_threshold_mode
        self.hessian_iters = hessian_iters
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_every_n_runs = checkpoint_every_n_runs
        self.segment_points = segment_points
        self.loss_fn = loss_fn
        self.output_fn = output_fn
        self.chunk_size = chunk_size
        self._layer_params: dict[str, list[str]] = {}
        self._init: dict[str, Tensor] | None = None
        self._kept: list[tuple[int, dict[str, Tensor]]] = []
        self._before_step: WeightSnapshot | None = None  # shared, read-only

    # ------------------------------------------------------------------ hooks
    @override
    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = select_layers(pl_module, self.layers, None if self.layers else nn.Module)
        trainable = set(trainable_parameters(pl_module))
        self._layer_params = {}
        for name, module in layers.items():
            own = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            own = [p for p in own if p in trainable]
            if own:
                self._layer_params[name] = own

    @override
    def on_probe_set_ready(
        self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet
    ) -> None:
        if self._init is None:  # not restored from a checkpoint: this is the initialisation
            self._init = {k: v.clone() for k, v in trainable_parameters(pl_module).items()}

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step + 1  # the step this optimizer step is about to complete
        if (
            self.schedule.step_based
            and self.schedule.runs_at_step(step)
            and not self._should_skip(trainer)
        ):
            self._before_step = weights_before_step(trainer, pl_module, step, self, self._warn_once)

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted cost of the first run (see :meth:`ProbeCallback.predict_cost`).

        The first run draws the loss planes: ``resolution²`` points per plane, each at most one
        forward pass over the probe set, and a contour figure per plane; plus the loss, the
        Hessian's Lanczos steps (about four forward passes per Hessian-vector product) and the
        segments to kept checkpoints.
        """
        forwards = 1.0
        figures = 0
        if self.plane_every_n_runs:
            forwards += len(self.planes) * self.plane_resolution**2
            figures += len(self.planes) if plog.matplotlib_available() else 0
        if self.hessian_top_k is not None:
            forwards += 4 * (self.hessian_iters or max(40, 2 * self.hessian_top_k + 20))
        return units.seconds(forwards=forwards, figures=figures)

    # ------------------------------------------------------------------ the probe
    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        theta = trainable_parameters(pl_module)
        metrics: dict[str, float | Tensor] = {}
        metrics.update(self._geometry(theta))
        before = self._before_step  # dropped once logged (kept for a retry after an OOM)
        if before is not None:
            metrics.update(self._update_cosines(theta, before.tensors))
        metrics[self.key("loss")] = probe_loss(pl_module, data, theta, **self._loss_kw)
        if self.hessian_top_k is not None:
            metrics.update(self._hessian(pl_module, data, theta))
        if self.keep_checkpoints:
            metrics.update(self._segments(trainer, pl_module, data, theta))
        self.log_scalars(trainer, pl_module, metrics)
        self._before_step = None
        if self.plane_every_n_runs and self._runs % self.plane_every_n_runs == 0:
            self._planes(trainer, pl_module, data, theta)

    @property
    def _loss_kw(self) -> dict[str, Any]:
        """How the probe-set loss is evaluated (loss, logits, chunks)."""
        return {"loss_fn": self.loss_fn, "output_fn": self.output_fn, "chunk_size": self.chunk_size}

    def _groups(self, theta: Mapping[str, Tensor]) -> list[tuple[str | None, list[str]]]:
        """The model (``None``: every trainable parameter), then each selected layer."""
        return [(None, list(theta)), *self._layer_params.items()]

    def _geometry(self, theta: Mapping[str, Tensor]) -> dict[str, float | Tensor]:
        assert self._init is not None
        # restored from a checkpoint on the CPU: move once, keep it on the model's device
        self._init = {k: v.to(theta[k].device) if k in theta else v for k, v in self._init.items()}
        init = self._init
        out: dict[str, float | Tensor] = {}
        for layer, names in self._groups(theta):
            now = flatten({k: theta[k] for k in names})
            drift = drift_from_init(now, flatten({k: init[k] for k in names}))
            for quantity in ("radius", "distance_from_init", "angle_from_init"):
                out[self.key(quantity, layer)] = drift[quantity]
            if layer is None:
                out[self.key("init_radial_cosine")] = drift["init_radial_cosine"]
        return out

    def _update_cosines(
        self, theta: Mapping[str, Tensor], before: Mapping[str, Tensor]
    ) -> dict[str, float | Tensor]:
        return {
            self.key("update_radial_cosine", layer): update_radial_cosine(
                flatten({k: theta[k] for k in names}), flatten({k: before[k] for k in names})
            )
            for layer, names in self._groups(theta)
        }

    def _hessian(
        self, pl_module: LightningModule, data: ProbeSet, theta: Mapping[str, Tensor]
    ) -> dict[str, float | Tensor]:
        assert self.hessian_top_k is not None
        dim = sum(p.numel() for p in theta.values())
        eigs = hessian_top_eigenvalues(
            pl_module,
            data,
            theta,
            k=min(self.hessian_top_k, dim),
            num_iters=None if self.hessian_iters is None else min(self.hessian_iters, dim),
            generator=torch.Generator().manual_seed(self.seed + 7919 * self._runs),
            **self._loss_kw,
        )
        tau = short_direction_threshold(eigs, self.hessian_threshold, self.hessian_threshold_mode)
        return {
            self.key("hessian_max_eigenvalue"): float(eigs[0]),
            self.key("short_directions"): float(count_short_directions(eigs, tau)),
        }

    def _segments(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        data: ProbeSet,
        theta: Mapping[str, Tensor],
    ) -> dict[str, float | Tensor]:
        out: dict[str, float | Tensor] = {}
        curves = []
        for lag, (step, kept) in enumerate(reversed(self._kept), start=1):
            start = {k: v.to(theta[k].device, theta[k].dtype) for k, v in kept.items()}
            t, losses = loss_along_path(
                pl_module,
                data,
                [start, dict(theta)],
                points_per_segment=self.segment_points,
                **self._loss_kw,
            )
            out[self.key(f"segment_barrier_lag{lag}")] = interpolation_barrier(losses, t.float())
            out[self.key(f"segment_midpoint_loss_lag{lag}")] = losses[len(losses) // 2]
            curves.append((step, t, losses))
        if curves and self.figures_enabled():
            log_segments(trainer, self.key, curves)
        if self._runs % self.checkpoint_every_n_runs == 0:  # kept in the training dtype
            copy = {k: v.clone() for k, v in trained_parameters(pl_module).items() if k in theta}
            self._kept = [*self._kept, (trainer.global_step, copy)][-self.keep_checkpoints :]
        return out

    def _planes(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        data: ProbeSet,
        theta: Mapping[str, Tensor],
    ) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._runs)
        for kind in self.planes:
            u, v = plane_directions(theta, kind, generator=gen, one_dim=self.one_dim)
            plane = loss_plane(
                pl_module,
                data,
                theta,
                u,
                v,
                resolution=self.plane_resolution,
                span=self.plane_span,
                **self._loss_kw,
            )
            log_plane(trainer, self.key, kind, plane, figures=self.figures_enabled())

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._init is not None:
            state["init"] = {k: v.detach().cpu() for k, v in self._init.items()}
        if self._kept:
            state["kept_steps"] = [step for step, _ in self._kept]
            state["kept"] = [{k: v.detach().cpu() for k, v in p.items()} for _, p in self._kept]
        return state

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        init = state.get("init")
        self._init = None if init is None else {k: v.clone() for k, v in init.items()}
        steps = state.get("kept_steps", [])
        self._kept = [(int(s), dict(p)) for s, p in zip(steps, state.get("kept", []))]

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {**super()._state_key_config(), "layers": self.layers}
