r"""``LayerCKACallback``: per-layer tangent-kernel alignment with the labels during training.

Lou et al. (ICML 2022), after Baratin et al. (2021): for each layer ``l`` the tangent kernel
:math:`K_l = J_l J_l^T` of the logits w.r.t. that layer's own parameters on a fixed probe set,
and its alignment :math:`A_l = \tilde y^T K_c \tilde y / (\|K_c\|_F \|\tilde y\|^2)` with the
centred one-hot labels. Plotted against depth, :math:`A_l` rises early in training and peaks at
a hidden layer: the "alignment hierarchy".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pytorch_lightning import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lightning_probes import logging as plog
from lightning_probes.callbacks.base import ProbeCallback
from lightning_probes.callbacks.checks import finite_flags
from lightning_probes.callbacks.plots.cka import log_alignment_figures, log_kernel
from lightning_probes.core.cost import CostUnits
from lightning_probes.core.data import ProbeSet
from lightning_probes.core.evaluation import OutputFn, chunks
from lightning_probes.core.kernels.cost import kernel_probe_cost
from lightning_probes.core.kernels.estimate import estimate_layer_alignments
from lightning_probes.core.kernels.stats import kernel_statistics
from lightning_probes.core.kernels.tangent import resolve_layers, tangent_kernel_factors
from lightning_probes.core.layers import check_layer_spec

Estimator = Literal["exact", "hutchinson"]


class LayerCKACallback(ProbeCallback):
    r"""Log each layer's kernel-label alignment, stable rank and trace; draw the hierarchy.

    Per layer (keys ``probes/cka/<layer>/<quantity>``): ``alignment`` :math:`A_l`,
    ``stable_rank`` of :math:`K_c`, ``trace`` of :math:`K_l`. Model level: ``peak_layer_index``
    (position among the selected layers) and ``peak_alignment``; the peak layer's name goes to
    TensorBoard text ``probes/cka/peak_layer``. Figures: ``probes/cka/alignment_vs_layer`` (this
    run) and ``probes/cka/alignment_hierarchy`` (layer × step heatmap of all runs so far);
    optionally ``probes/cka/<layer>/kernel`` images (centred kernel, samples sorted by label).

    One layer's kernel is formed, reduced and dropped before the next; with ``chunk_size`` not
    even one layer's whole kernel is held. The alignment history is part of the checkpoint.

    Args:
        layers: Layer names or globs (``model.named_modules()``); default every Linear/Conv/HF
            ``Conv1D`` that runs in the forward and shares no parameter (not tied).
        probe_size: Probe samples drawn from the train loader (the paper uses 200-2000).
        output_fn: Maps the module's output to logits ``[n, o]``.
        centering: ``"samples"`` (authors' code) or ``"full"`` (paper eq. (6)).
        chunk_size: Samples per forward/backward and kernel block (bounded memory).
        stable_rank: Log the stable rank (with ``chunk_size`` it needs repeated kernel passes).
        log_kernels: Log each layer's centred kernel as an image (at most 256 × 256 pixels).
        log_figures: Log the alignment-vs-layer and hierarchy figures (needs matplotlib).
        estimator: ``"exact"`` kernels, or ``"hutchinson"`` (matrix-free estimate of
            :math:`\|K_c\|_F` for models too large for exact kernels; no stable rank/trace).
        num_probes: Hutchinson probes per layer.
        **kwargs: Schedule, probe data and error handling of
            :class:`~lightning_probes.callbacks.base.ProbeCallback`.

    Example:
        >>> cb = LayerCKACallback(probe_size=128, every_n_steps=50)
        >>> cb.probe_name
        'cka'
    """

    probe_name = "cka"
    needs_grad = True
    needs_targets = True
    needs_class_targets = True
    default_schedule: ClassVar[dict[str, Any]] = {"every_n_steps": 50}

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        *,
        probe_size: int = 512,
        output_fn: OutputFn | None = None,
        centering: Literal["samples", "full"] = "samples",
        chunk_size: int | None = None,
        stable_rank: bool = True,
        log_kernels: bool = False,
        log_figures: bool = True,
        estimator: Estimator = "exact",
        num_probes: int = 50,
        **kwargs: Any,
    ) -> None:
        super().__init__(probe_size=probe_size, **kwargs)
        check_layer_spec(layers)
        if centering not in ("samples", "full"):
            raise ValueError(f"`centering` can be 'samples' or 'full', got {centering!r}.")
        if estimator not in ("exact", "hutchinson"):
            raise ValueError(f"`estimator` can be 'exact' or 'hutchinson', got {estimator!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"Expected `chunk_size` to be a positive int or None, got {chunk_size!r}."
            )
        if not isinstance(num_probes, int) or num_probes < 2:
            raise ValueError(f"Expected `num_probes` to be an int >= 2, got {num_probes!r}.")
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"Expected `output_fn` to be callable, got {type(output_fn).__name__}.")
        self.layers = layers
        self.output_fn = output_fn
        self.centering = centering
        self.chunk_size = chunk_size
        self.stable_rank = stable_rank
        self.log_kernels = log_kernels
        self.log_figures = log_figures
        self.estimator = estimator
        self.num_probes = num_probes
        self._layer_names: list[str] = []
        self._steps: list[int] = []
        self._alignments: list[list[float]] = []

    @property
    def history(self) -> tuple[list[int], np.ndarray]:
        """``(steps, alignments [runs, layers])`` of every run so far (NaN where undefined)."""
        return list(self._steps), np.asarray(self._alignments, dtype=np.float64).reshape(
            len(self._steps), len(self._layer_names)
        )

    @override
    def _state_key_config(self) -> dict[str, Any]:
        return {
            **super()._state_key_config(),
            "layers": self.layers,
            "centering": self.centering,
            "estimator": self.estimator,
            "chunk_size": self.chunk_size,
            "probe_size": self.probe_size,
        }

    @override
    def check_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layer_names = list(resolve_layers(pl_module, self.layers))

    @override
    def validate(self, pl_module: LightningModule, data: ProbeSet) -> None:
        # the real capture on two samples: a layer called twice, BatchNorm in train mode or a
        # dict output without `output_fn` fail here, before training starts
        inputs = chunks(data, 2)[0][0]
        if self.layers is None:  # the default layers that run (not MHA's out_proj), untied
            self._layer_names = list(resolve_layers(pl_module, None, inputs=inputs))
        layers = resolve_layers(pl_module, self._layer_names or self.layers)
        with torch.enable_grad():
            tangent_kernel_factors(pl_module, inputs, layers=layers, output_fn=self.output_fn)
            if self.estimator == "hutchinson" and data.targets is not None:
                x = chunks(data, 2)[0][0]  # forward-mode products: not every op has them
                y = data.targets[:2]
                try:
                    estimate_layer_alignments(
                        pl_module, x, y, layers=layers, output_fn=self.output_fn,
                        centering=self.centering, num_probes=2,
                    )  # fmt: skip
                except NotImplementedError as err:
                    raise ValueError(
                        f"LayerCKACallback(estimator='hutchinson') needs forward-mode AD through "
                        f"the model, which an op here lacks ({err}). Use estimator='exact'."
                    ) from err

    @override
    def predict_cost(
        self, pl_module: LightningModule, data: ProbeSet, units: CostUnits
    ) -> float | None:
        """Predicted cost of the first run (see :meth:`ProbeCallback.predict_cost`).

        Exact kernels: one capture forward, ``o`` batched backward passes, and per layer the
        kernel product, its statistics and the stable rank's block Lanczos
        (:func:`~lightning_probes.core.kernels.cost.kernel_probe_cost`); plus two figures, and
        one per layer with ``log_kernels``. The Hutchinson estimator is not predicted.
        """
        if self.estimator != "exact":
            return None
        layers = resolve_layers(pl_module, self._layer_names or self.layers)
        flops, moved = kernel_probe_cost(
            layers.values(),
            units.num_samples,
            units.num_outputs,
            chunk_size=self.chunk_size,
            stable_rank=self.stable_rank,
        )
        kernels = len(layers) if self.log_kernels and self.chunk_size is None else 0
        figures = 2 + kernels if self.log_figures and plog.matplotlib_available() else 0
        return units.seconds(
            forwards=1 + 2 * units.num_outputs, flops=flops, memory_bytes=moved, figures=figures
        )

    @override
    def probe(self, trainer: Trainer, pl_module: LightningModule, data: ProbeSet) -> None:
        layers = resolve_layers(pl_module, self._layer_names or self.layers)
        assert data.targets is not None
        if self.estimator == "hutchinson":
            est = estimate_layer_alignments(
                pl_module, data.inputs, data.targets, layers=layers, output_fn=self.output_fn,
                centering=self.centering, num_probes=self.num_probes,
                generator=torch.Generator().manual_seed(self.seed + trainer.global_step),
            )  # fmt: skip
            values = {name: {"alignment": e.alignment} for name, e in est.items()}
        else:
            values = self._exact(trainer, pl_module, data, layers)
        alignments = [float(values[name]["alignment"]) for name in layers]
        self._steps.append(trainer.global_step)
        self._alignments.append(alignments)
        metrics: dict[str, float | Tensor] = {
            self.key(q, name): v for name, qs in values.items() for q, v in qs.items()
        }
        finite = [(a, i) for i, a in enumerate(alignments) if np.isfinite(a)]
        if finite:
            best, index = max(finite)
            metrics[self.key("peak_layer_index")] = float(index)
            metrics[self.key("peak_alignment")] = best
            plog.log_text(trainer, self.key("peak_layer"), f"{list(layers)[index]}: A = {best:.4f}")
        ok = finite_flags(metrics)  # one host synchronisation
        self.log_scalars(trainer, pl_module, {k: v for k, v in metrics.items() if ok[k]})
        if self.log_figures and self.figures_enabled():
            steps, hist = self.history
            log_alignment_figures(trainer, self.key, steps, hist, self._layer_names)

    def _exact(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        data: ProbeSet,
        layers: Mapping[str, nn.Module],
    ) -> dict[str, dict[str, Tensor]]:
        assert data.targets is not None
        factors = tangent_kernel_factors(
            pl_module, data.inputs, layers=layers, output_fn=self.output_fn,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        keep = self.log_kernels and self.chunk_size is None
        values = {}
        for name in list(factors):
            stats = kernel_statistics(
                factors.pop(name), data.targets, centering=self.centering,
                chunk_size=self.chunk_size, stable_rank=self.stable_rank, keep_kernel=keep,
            )  # fmt: skip
            values[name] = {"alignment": stats.alignment, "trace": stats.trace}
            if self.stable_rank:
                values[name]["stable_rank"] = stats.stable_rank
            if stats.kernel is not None:
                log_kernel(
                    trainer,
                    self.key("kernel", name),
                    stats.kernel,
                    data.targets,
                    self.centering,
                    figure=self.log_figures and self.figures_enabled(),
                )
        return values

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "layer_names": list(self._layer_names),
            "steps": torch.tensor(self._steps, dtype=torch.long),
            "alignments": torch.tensor(self._alignments, dtype=torch.float64).reshape(
                len(self._steps), len(self._layer_names)
            ),
        }

    @override
    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "steps" not in state:
            return
        self._layer_names = list(state["layer_names"])
        self._steps = [int(s) for s in state["steps"].tolist()]
        self._alignments = [list(map(float, row)) for row in state["alignments"].tolist()]
