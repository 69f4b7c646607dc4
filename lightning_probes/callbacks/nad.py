r"""``NADCallback``: the architecture's Neural Anisotropy Directions, and how training uses them.

Ortiz-Jiménez, Modas, Moosavi-Dezfooli, Frossard, "Neural Anisotropy Directions",
NeurIPS 2020. At the start of fitting the callback computes the NADs of the model's
architecture from ``num_networks`` random initialisations
(:func:`~lightning_probes.core.nad.neural_anisotropy_directions`, the authors' procedure) and
logs the first NADs as images (pixel and Fourier domain) and the spectrum. Then, on its
schedule, it logs how the probe data's energy and the trained network's input-gradient
covariance distribute over the NAD basis: a network leaning on the "easy" first NADs puts its
gradient energy there.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.nad_progress import BasisProgress, announce_basis, predict_basis
from lightning_probes.callbacks.plots.nad import (
    log_direction_images,
    log_energy_figure,
    log_index_histogram,
    log_spectrum_figure,
)
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputAdapter
from lightning_probes.core.isolation import isolated
from lightning_probes.core.nad.directions import (
    NADResult,
    fresh_network_factory,
    input_gradient_energy,
    neural_anisotropy_directions,
)
from lightning_probes.core.precision import computation_dtype
from lightning_probes.functional.nad import nad_energy


class NADCallback(ProbeCallback):
    r"""Neural Anisotropy Directions of the architecture and the energy of training over them.

    Ortiz-Jiménez et al., "Neural Anisotropy Directions", NeurIPS 2020.

    Once (not again on resume: the basis is in the checkpoint), at the start of fitting with
    ``max_overhead=None``, otherwise at the first scheduled run its wall-time budget admits (the
    basis depends only on the architecture and ``seed``, so it is the same either way):
    ``probes/nad/directions`` (image grid of the first NADs), ``probes/nad/directions_fourier``
    (their centred 2-D DFT magnitude; rows of the 1-D DFT for flat inputs),
    ``probes/nad/spectrum`` (figure) and the scalar ``probes/nad/spectrum_share_top`` (share of
    the gradients' variance in the first ``top_k`` NADs). On the schedule, with
    :math:`e_i` the energy along NAD :math:`u_i` (data:
    :math:`\frac1n\sum_n\langle u_i,x_n\rangle^2`; gradients:
    :math:`\frac1n\sum_{n,c}\langle u_i,\nabla_x f_c(x_n)\rangle^2`, the uncentred
    input-gradient covariance along :math:`u_i`):

    - ``probes/nad/{data,grad}_energy_share_top``: :math:`\sum_{i<\text{top\_k}} e_i` over the
      total energy;
    - ``probes/nad/{data,grad}_energy_centroid``: energy-weighted mean NAD index over
      ``k - 1`` (0: all on the first NAD, 1: all on the last);
    - histograms ``probes/nad/{data,grad}_energy`` (NAD index weighted by energy share) and the
      figure ``probes/nad/energy``.

    Cost of the basis: ``num_networks`` forward passes over the ``2 d`` perturbed inputs
    (``d`` = input size), plus an SVD. The default ``num_networks=256`` is modest so fit start
    stays quick on CPU: about 0.25 s for a 64-128-128-10 MLP (1,000 networks: under 1 s), 10-25
    s for LeNet on 32x32 inputs. The paper uses 10,000 (pass ``num_networks=10_000`` on a
    GPU for publication-quality NADs of large inputs).

    Args:
        model_factory: ``() -> nn.Module`` building a freshly initialised network of the
            architecture with one output (or several: they are projected on a fixed random
            unit vector). Default: a deep copy of the trained model re-initialised by every
            submodule's ``reset_parameters()`` (the model itself is not touched).
        num_networks: Random networks ``m`` for the NADs (paper: 10,000).
        k: NADs to keep (default all ``min(m - 1, d)``).
        input_shape: Shape of one input; default: that of the probe set's samples.
        method: ``"secant"`` (the authors' central differences) or ``"autograd"``.
        step: Step of the central differences (the authors': 100).
        top_k: NADs counted by the ``*_share_top`` scalars (default ``ceil(k / 10)``).
        num_images: NADs shown in the image grids.
        output_fn: Maps the model output to logits ``(n, o)`` for the gradient energy.
        memory_budget: Bytes of activations per call while computing the NADs.
        max_memory_bytes: Cap on the bytes the random networks of one chunk hold while
            computing the NADs (default: a quarter of the free GPU memory; no cap on the CPU).
        **kwargs: Schedule, probe data and the rest of
            :class:`~lightning_probes.callbacks.base.ProbeCallback` (``seed`` also seeds the
            NADs).

    Raises:
        ValueError: For invalid arguments.
        TypeError: If ``model_factory`` is not callable.

    Example:
        >>> cb = NADCallback(num_networks=256, every_n_steps=100)
        >>> cb.state_key.startswith("NADCallback")
        True
    """

    probe_name = "nad"
    needs_grad = True
    needs_targets = False
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 100}

    def __init__(
        self,
        model_factory: Callable[[], nn.Module] | None = None,
        *,
        num_networks: int = 256,
        k: int | None = None,
        input_shape: Sequence[int] | None = None,
        method: str = "secant",
        step: float = 100.0,
        top_k: int | None = None,
        num_images: int = 16,
        output_fn: Callable[[Any], Tensor] | None = None,
        memory_budget: int | None = None,
        max_memory_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if model_factory is not None and not callable(model_factory):
            raise TypeError(
                "Expected `model_factory` to be a callable () -> nn.Module, got "
                f"{type(model_factory).__name__}."
            )
        if not _positive_int(num_networks) or num_networks < 2:
            raise ValueError(f"Expected `num_networks` to be an int >= 2, got {num_networks!r}.")
        for name, value in (("k", k), ("top_k", top_k)):
            if value is not None and not _positive_int(value):
                raise ValueError(f"Expected `{name}` to be a positive int or None, got {value!r}.")
        if method not in ("secant", "autograd"):
            raise ValueError(f"`method` can be 'secant' or 'autograd', got {method!r}.")
        if not step > 0:
            raise ValueError(f"Expected `step` to be a positive float, got {step!r}.")
        if not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"Expected `num_images` to be an int >= 0, got {num_images!r}.")
        if input_shape is not None and not all(_positive_int(s) for s in input_shape):
            raise ValueError(
                f"Expected `input_shape` to be a sequence of positive ints, got {input_shape!r}."
            )
        self.model_factory = model_factory
        self.num_networks = num_networks
        self.k = k
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        self.method = method
        self.step = float(step)
        self.top_k = top_k
        self.num_images = num_images
        self.output_fn = output_fn
        self.memory_budget = memory_budget
        self.max_memory_bytes = max_memory_bytes
        self._nads: NADResult | None = None
        self._basis: Tensor | None = None

    @property
    def nads(self) -> NADResult | None:
        """The architecture's NADs (``None`` until computed: see the class docstring)."""
        return self._nads

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {
            **super()._state_key_config(),
            "num_networks": self.num_networks,
            "method": self.method,
            "k": self.k,
        }

    # ------------------------------------------------------------------ fit start
    @override
    def on_probe_set_ready(
        self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet
    ) -> None:
        if not isinstance(data.inputs, Tensor):
            raise TypeError(
                "NADCallback needs probe inputs that are one Tensor (n, *input_shape), got "
                f"{type(data.inputs).__name__}. Pass `probe_data=` or `batch_to_inputs_targets=`."
            )
        if not torch.is_floating_point(data.inputs):
            raise ValueError(
                "NADCallback needs floating-point inputs: NADs are directions in a continuous "
                f"input space, but the probe inputs are {data.inputs.dtype} (token ids?). Use it "
                "on models whose inputs are real-valued (images, signals, features)."
            )
        shape = tuple(data.inputs.shape[1:])
        if self.input_shape is not None and self.input_shape != shape:
            raise ValueError(
                f"Expected probe inputs of `input_shape` {self.input_shape}, got samples of "
                f"shape {shape}."
            )
        if self._nads is not None:  # resumed: the basis came with the checkpoint
            if tuple(self._nads.directions.shape[1:]) != shape:
                saved = tuple(self._nads.directions.shape[1:])
                raise ValueError(
                    f"Expected the checkpointed NADs' shape {saved} to match the probe inputs' "
                    f"shape {shape}."
                )
        elif self.max_overhead is None:
            # isolated: whatever the factory does, the model, its grads and every RNG stream
            # (training's dropout and shuffling) are as before
            with isolated(pl_module, grad=True):
                self._compute_basis(trainer, pl_module, shape)
        # else: computed by the first run the budget admits (its cost is predicted)
        self._basis = None

    def _compute_basis(
        self, trainer: Trainer, pl_module: LightningModule, shape: tuple[int, ...]
    ) -> None:
        """Compute the NADs of ``pl_module``'s architecture and log them (inside ``isolated``)."""
        factory = self.model_factory or fresh_network_factory(pl_module)
        if self.output_fn is not None:
            output_fn, make = self.output_fn, factory
            factory = lambda: OutputAdapter(make(), output_fn)  # noqa: E731
        data = self.probe_set
        predicted = (
            None
            if data is None
            else predict_basis(pl_module, data, self.num_networks, self.output_fn)
        )
        announce_basis(type(self).__name__, predicted, self.num_networks, shape)
        nads = neural_anisotropy_directions(
            factory,
            shape,
            num_networks=self.num_networks,
            method=self.method,  # type: ignore[arg-type]
            step=self.step,
            k=None if self.k is None else min(self.k, self.num_networks - 1, math.prod(shape)),
            generator=torch.Generator().manual_seed(self.seed),
            memory_budget=self.memory_budget,
            max_memory_bytes=self.max_memory_bytes,
            device=pl_module.device,
            progress=BasisProgress(type(self).__name__),
        )
        self._nads = _to_cpu(nads)
        self._log_basis(trainer, pl_module)

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted cost of the first run (see :meth:`ProbeCallback.predict_cost`).

        The basis, if not computed yet: per network, building it (timed once here) and about
        ``(2d + 1) / n`` forward passes over the probe set; its figure and images. Then the
        run: the input gradients (about three forward passes) and a figure.
        """
        figure = units.figure_seconds if plog.matplotlib_available() else 0.0
        seconds = units.seconds(forwards=3) + figure
        if self._nads is None:
            d = math.prod(data.inputs.shape[1:])
            with warnings.catch_warnings():  # the basis itself warns, once, if it must
                warnings.simplefilter("ignore")
                factory = self.model_factory or fresh_network_factory(pl_module)
                start = time.perf_counter()
                factory()
                build = time.perf_counter() - start
            per_network = build + units.seconds(forwards=(2 * d + 1) / max(units.num_samples, 1))
            seconds += self.num_networks * per_network + 2 * figure
        return seconds

    def _top(self) -> int:
        assert self._nads is not None
        k = self._nads.directions.shape[0]
        return min(k, self.top_k or max(1, math.ceil(k / 10)))

    def _log_basis(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._nads is not None
        nads = self._nads
        share = float(nads.explained_variance_ratio[: self._top()].sum())
        plog.log_scalars(trainer, pl_module, {self.key("spectrum_share_top"): share}, on_step=None)
        plog.log_histogram(trainer, self.key("singular_values"), nads.singular_values)
        if self.num_images:
            log_direction_images(
                trainer,
                self.key("directions"),
                self.key("directions_fourier"),
                nads.directions[: self.num_images],
                figure=self.figures_enabled(),
            )
        if self.figures_enabled():
            log_spectrum_figure(trainer, self.key("spectrum"), nads.singular_values)

    # ------------------------------------------------------------------ scheduled
    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        if self._nads is None:  # deferred by the budget: this run computes it first
            self._compute_basis(trainer, pl_module, tuple(data.inputs.shape[1:]))
        assert self._nads is not None
        x = data.inputs
        if self._basis is None or self._basis.device != x.device:
            self._basis = self._nads.directions.to(x.device)
        data_e, data_total = nad_energy(x, self._basis)
        grad_e, grad_total = input_gradient_energy(
            pl_module, x.to(computation_dtype(pl_module)), self._basis, output_fn=self.output_fn
        )
        top = self._top()
        metrics: dict[str, float] = {}
        for name, e, total in (("data", data_e, data_total), ("grad", grad_e, grad_total)):
            metrics[self.key(f"{name}_energy_share_top")] = float(e[:top].sum() / total)
            metrics[self.key(f"{name}_energy_centroid")] = _centroid(e)
            log_index_histogram(trainer, self.key(f"{name}_energy"), e / total)
        self.log_scalars(trainer, pl_module, metrics)
        if self.figures_enabled():
            log_energy_figure(trainer, self.key("energy"), data_e / data_total, grad_e / grad_total)

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        if self._nads is None:
            return {}
        n = self._nads
        return {
            "directions": n.directions,
            "singular_values": n.singular_values,
            "explained_variance": n.explained_variance,
            "explained_variance_ratio": n.explained_variance_ratio,
            "eval_point": n.eval_point,
            "num_networks": n.num_networks,
            "method": n.method,
        }

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "directions" in state:
            self._nads = NADResult(
                directions=state["directions"],
                singular_values=state["singular_values"],
                explained_variance=state["explained_variance"],
                explained_variance_ratio=state["explained_variance_ratio"],
                eval_point=state["eval_point"],
                num_networks=int(state["num_networks"]),
                method=str(state["method"]),
            )
            self._basis = None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _to_cpu(nads: NADResult) -> NADResult:
    return NADResult(
        directions=nads.directions.detach().cpu(),
        singular_values=nads.singular_values.detach().cpu(),
        explained_variance=nads.explained_variance.detach().cpu(),
        explained_variance_ratio=nads.explained_variance_ratio.detach().cpu(),
        eval_point=nads.eval_point.detach().cpu(),
        num_networks=nads.num_networks,
        method=nads.method,
    )


def _centroid(energy: Tensor) -> float:
    k = energy.numel()
    total = float(energy.sum())
    if k < 2 or total == 0.0:
        return 0.0
    index = torch.arange(k, dtype=energy.dtype, device=energy.device)
    return float((index * energy).sum() / total / (k - 1))
