r"""What the probes need of one layer type: the interface every registry entry implements.

A :class:`LayerOps` answers, for one module type, the questions the probes ask of a layer;
the defaults describe a layer the probes know nothing about, so an entry overrides only what
its type supports, and each probe falls back to its general path (e.g. :mod:`torch.func`
per-sample gradients for the kernels, or the full forward pass) where an answer is missing.

Index letters: ``n`` samples, ``o`` outputs of the network, ``T`` positions (sequence
elements, conv output pixels), ``G`` groups, ``I`` input features of one group (a patch),
``M`` output features of one group, ``P`` weight points (landscape planes), ``u`` units.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

#: Which positions of a layer's weight meet each input element, for the NAD first-layer
#: shortcut: ``(pix, kk, ll, positions, out_shape)`` with ``weight.reshape(c_out, -1)[:, kk]``
#: multiplying input element ``pix`` at output position ``ll``.
InputColumns = tuple[Tensor, Tensor, Tensor, int, tuple[int, ...]]


def unit_axis(unit_dim: int, ndim: int) -> int:
    """The axis of a ``ndim``-dimensional tensor ``[n, ...]`` that indexes units ``unit_dim``.

    Args:
        unit_dim: 1 (channels) or -1 (the last axis).
        ndim: Number of dimensions, the sample axis included.
    """
    return 1 if unit_dim == 1 else ndim - 1


class LayerOps:
    """What the probes need of a layer type. Subclass it and override what applies.

    Attributes:
        unit_dim: The output axis that indexes units (features/channels) for ablation:
            1 (channels, or the features of an ``[n, u]`` output) or -1 (the last axis).
        spatial_dims: Number of axes the layer slides over (0 for a dense map, 2 for
            ``Conv2d``).
        foldable: Parameter-free and applied to each sample alone, so it runs on many weight
            points at once with points and samples folded into one batch (landscape chain).
        channelwise: Acts on each unit (channel) separately, so an intervention on some units
            leaves the others alone (between a layer and its ablation point).
        activation: An elementwise activation: may be the ablation point a layer's sparse
            computation leads to.
        passes_units: Keeps the unit layout of its input (normalisation, dropout, identity):
            the ablation point moves past it to the activation.
        non_negative: Its output is >= 0 for every input (``ReLU``, ``Sigmoid``, ...): the
            class selectivity index (Morcos et al. 2018, eq. 1) is defined on its units.
        pointwise: The elementwise function itself, for the NAD local-prefix shortcut.
        jointly_affine: Its output is affine in its parameters jointly (Linear, Conv,
            eval-mode BatchNorm, LayerNorm), so :meth:`per_point_forward` evaluates many weight
            points at once (landscape planes).
        default_layer: A weight layer the kernel probes select when ``layers=None`` (Linear,
            Conv, HF ``Conv1D``, ``nn.MultiheadAttention``), provided it runs once per forward
            and shares no parameter.
        output_index: Where the probes read the layer's output tensor: ``None`` for a layer
            returning a tensor, ``k`` for ``output[k]`` of a layer returning a tuple
            (``nn.MultiheadAttention``: the attention output ``output[0]``).
    """

    unit_dim: int = 1
    spatial_dims: int = 0
    foldable: bool = False
    channelwise: bool = False
    activation: bool = False
    passes_units: bool = False
    non_negative: bool = False
    pointwise: Callable[[Tensor], Tensor] | None = None
    jointly_affine: bool = False
    default_layer: bool = False
    output_index: int | None = None

    # ------------------------------------------------------------------ every probe
    def per_sample(self, module: nn.Module) -> bool:
        """Whether each sample's output depends on that sample only, in the current mode.

        Deterministically: no batch statistics, no dropout, no flattening of the batch axis.
        """
        return True

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's map on ``x`` with ``weight``/``bias`` in place of its own (affine layers).

        Raises:
            NotImplementedError: If the layer is not an affine map of its weight.
        """
        raise NotImplementedError(f"{type(self).__name__} has no weight map for {module!r}.")

    def moves_samples(self, module: nn.Module, axis: int, ndim: int) -> bool:
        """Whether samples found on ``axis`` of the ``ndim``-dim output may be moved to axis 0.

        True where the layer computes every position of its leading axes alone (a Linear or
        LayerNorm on the last axis, an Embedding), so that its input and output, with the sample
        axis moved first in both, are those of a sample-first call: e.g. ``linear1`` of a
        sequence-first ``nn.TransformerEncoderLayer`` (``[T, n, d]``). Default: axis 0 only.
        """
        return axis == 0

    # ------------------------------------------------------------------ layer tangent kernels
    def layer_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the layer: by default those it owns directly.

        A layer that computes with its children's weights without calling them
        (``nn.MultiheadAttention`` and its ``out_proj``) owns them all (dotted names).
        """
        return dict(module.named_parameters(recurse=False))

    def sample_first_inputs(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        axis: int,
        num_samples: int,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """The recorded call's inputs in the form :meth:`functional_forward` takes.

        Every per-sample tensor of that form holds the samples on axis 0 and is positional;
        the keywords are shared by all samples. ``None`` (the default): the layer takes one
        tensor, whose sample axis is moved to 0 like its output's.

        Args:
            module: The layer.
            args: Positional inputs of its recorded call.
            kwargs: Keyword inputs of that call.
            axis: The sample axis of its output.
            num_samples: Samples of the forward that recorded it.

        Raises:
            ValueError: If the call's inputs do not hold the samples where the layer needs them.
        """
        return None

    def functional_forward(
        self,
        module: nn.Module,
        params: dict[str, Tensor],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Tensor:
        """The layer's output tensor ``[b, ...]`` with ``params`` in place of its parameters.

        Called by the :mod:`torch.func` kernel path inside ``vmap``/``vjp`` on sample-first
        inputs (:meth:`sample_first_inputs`), ``b`` samples at a time.
        """
        out = functional_call(module, params, args, kwargs)
        return out if self.output_index is None else out[self.output_index]

    def kernel_factors(
        self, module: nn.Module, x: Tensor, grads: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        r"""Factors ``(a [n, T, G, I], δ [o, n, T, G, M])`` of the layer's tangent kernel.

        For an affine layer :math:`z_{ipg} = W_g a_{ipg} + b_g` and
        :math:`\delta^c_{ipg} = \partial f_c(x_i) / \partial z_{ipg}` (Lou et al. 2022,
        eq. (9)). ``None``: per-sample gradients with :mod:`torch.func` instead.

        Args:
            module: The layer.
            x: Its input ``[n, ...]``, in the gradients' dtype.
            grads: ``[o, n, *output sample shape]``, gradients of each logit w.r.t. its output.
        """
        return None

    def flat_kernel(self, module: nn.Module) -> bool:
        """Whether eq. (9)'s forward/backward kernels apply (a dense map on flat inputs)."""
        return False

    # ------------------------------------------------------------------ unit ablation
    def accepts_units(self, module: nn.Module, unit_dim: int, ndim: int) -> bool:
        """Whether the ablation shortcuts can run this layer on units along ``unit_dim``.

        That is, whether its linear part separates over the units of an ``ndim``-dimensional
        input along that axis.
        """
        return False

    def unit_contributions(
        self, module: nn.Module, d: Tensor, out_shape: tuple[int, ...]
    ) -> Tensor:
        r"""``[u, n, ...]``: the layer's linear part (no bias) applied to each input unit alone.

        Args:
            module: The layer.
            d: ``[n, ...]`` input (units along :meth:`accepts_units`'s axis).
            out_shape: The spatial shape of the layer's output (``()`` for dense layers).
        """
        raise NotImplementedError(f"{type(self).__name__} has no unit contributions.")

    def select_outputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """The weight of output units ``idx`` only (rows of ``[out, in, ...]``)."""
        return weight.index_select(0, idx)

    def select_inputs(self, weight: Tensor, idx: Tensor) -> Tensor:
        """The weight of input units ``idx`` only (columns of ``[out, in, ...]``)."""
        return weight.index_select(1, idx)

    # ------------------------------------------------------------------ landscape planes
    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """The layer with per-point parameters ``w`` (``[P, *shape]``) on ``z [P, n, ...]``.

        Raises:
            NotImplementedError: Unless :attr:`jointly_affine`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no per-point forward.")

    # ------------------------------------------------------------------ NAD first layer
    def accepts_input(self, module: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """Whether the NAD first-layer shortcut handles this layer on one ``input_shape``.

        Then :meth:`input_columns` and :meth:`apply` are defined for it.
        """
        return False

    def input_columns(self, module: nn.Module, input_shape: tuple[int, ...]) -> InputColumns:
        """Where each input element meets the weight (see :data:`InputColumns`).

        Raises:
            NotImplementedError: Unless :meth:`accepts_input`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no input columns.")
