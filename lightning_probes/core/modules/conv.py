r"""Convolutions ``nn.Conv1d/2d/3d`` and the one convolution geometry (unfold, padding modes).

A convolution is an affine map of its input patches: with ``a_{ipg}`` the patch of sample
``i`` at output position ``p`` in group ``g`` (``C_in/G · kernel size`` values),
:math:`z_{ipg} = W_g a_{ipg} + b_g`. The patches come from :func:`conv_patches`, which pads
exactly as ``Conv*d.forward`` does (non-zero padding modes and string padding applied
explicitly with the module's own amounts, :func:`pad_explicitly`); the channels are the units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_probes.core.modules.ops import InputColumns, LayerOps

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolution types of the registry (also the default layers of the probes)."""

ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def pad_explicitly(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` padded with the module's own amounts and mode, as ``Conv*d.forward`` does."""
    pads = list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]
    mode = "constant" if module.padding_mode == "zeros" else str(module.padding_mode)
    return F.pad(x, pads, mode=mode)


def unfold_input(module: nn.Module, x: Tensor) -> Tensor:
    """Input patches of a Conv1d/2d as columns, ``[n, C_in · kernel size, L]``."""
    conv: Any = module
    one_d = conv.weight.ndim == 3
    padding: tuple[int, ...]
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = pad_explicitly(module, x)
        padding = (0, 0)
    else:
        padding = (0, conv.padding[0]) if one_d else tuple(conv.padding)
    as2 = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
    return F.unfold(
        x.unsqueeze(-2) if one_d else x,
        kernel_size=as2(conv.kernel_size),
        dilation=as2(conv.dilation),
        padding=padding,
        stride=as2(conv.stride),
    )


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Input patches of a Conv1d/2d, ``[n, L, G, C_in/G · kernel size]`` (L output positions).

    Non-zero padding modes and string padding (``"same"``) are applied explicitly with the
    module's own padding amounts, exactly as ``Conv*d.forward`` does.
    """
    patches = unfold_input(module, x)  # [n, C_in · kh · kw, L]
    n, _, positions = patches.shape
    groups = int(module.groups)  # type: ignore[arg-type]
    return patches.view(n, groups, -1, positions).permute(0, 3, 1, 2)


def conv_output_grads(module: nn.Module, grads: Tensor) -> Tensor:
    """``[o, n, C_out, *spatial]`` → ``[o, n, L, G, C_out/G]``."""
    o, n = grads.shape[:2]
    g = int(module.groups)  # type: ignore[arg-type]
    c_out = int(module.out_channels)  # type: ignore[arg-type]
    return grads.reshape(o, n, g, c_out // g, -1).permute(0, 1, 4, 2, 3)


class ConvOps(LayerOps):
    """``nn.Conv{spatial_dims}d``: channels are the units.

    Args:
        spatial_dims: 1, 2 or 3.
    """

    unit_dim = 1
    jointly_affine = True
    default_layer = True

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims

    def apply(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The module's own convolution (stride, padding, mode, dilation, groups)."""
        return module._conv_forward(x, weight, bias)  # type: ignore[operator]

    def kernel_factors(
        self, module: nn.Module, x: Tensor, grads: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Patches ``[n, L, G, I]`` and output gradients ``[o, n, L, G, M]`` (Conv1d/2d).

        ``None`` for Conv3d, which ``unfold`` does not cover.

        Raises:
            ValueError: If the input is unbatched.
        """
        if self.spatial_dims == 3:
            return None
        weight: Tensor = module.weight  # type: ignore[assignment]
        if x.ndim == weight.ndim - 1:  # unbatched input is not a probe set
            raise ValueError(f"Expected batched inputs to {type(module).__name__}, got {x.shape}.")
        return conv_patches(module, x), conv_output_grads(module, grads)

    def accepts_units(self, module: nn.Module, unit_dim: int, ndim: int) -> bool:
        """Channels as units, one group."""
        return bool(module.groups == 1) and unit_dim == 1

    def unit_contributions(
        self, module: nn.Module, d: Tensor, out_shape: tuple[int, ...]
    ) -> Tensor:
        r""":math:`P_c = W_{\cdot c} * d_c`, ``[u, n, C_out, *out_shape]``.

        All channels in one convolution with ``groups = u`` or, for ``Conv2d`` with zero
        padding, one batched matmul over the unfolded input.
        """
        conv: Any = module
        weight: Tensor = conv.weight
        c_out, u = weight.shape[:2]
        if (
            self.spatial_dims == 2
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
        ):
            # im2col and one batched matmul: faster than the grouped convolution below
            n = d.shape[0]
            cols = unfold_input(module, d)
            cols = cols.view(n, u, weight.shape[2:].numel(), -1).transpose(0, 1)  # [u, n, k, L]
            p = torch.matmul(weight.transpose(0, 1).reshape(u, 1, c_out, -1), cols)
            return p.view(u, n, c_out, *out_shape)
        grouped = weight.transpose(0, 1).reshape(u * c_out, 1, *weight.shape[2:])
        fn = (F.conv1d, F.conv2d, F.conv3d)[d.ndim - 3]
        padding: Any = conv.padding
        if conv.padding_mode != "zeros":
            d = pad_explicitly(module, d)
            padding = 0
        out = fn(d, grouped, None, conv.stride, padding, conv.dilation, u)
        return out.view(out.shape[0], u, c_out, *out.shape[2:]).movedim(1, 0).contiguous()

    def per_point_forward(self, module: nn.Module, w: dict[str, Tensor], z: Tensor) -> Tensor:
        """The convolution of each point's weights on its own ``z[p]`` (a loop over ``P``)."""
        bias = w.get("bias")
        outs = [
            self.apply(module, z[p], w["weight"][p], None if bias is None else bias[p])
            for p in range(z.shape[0])
        ]
        return outs[0][None] if len(outs) == 1 else torch.stack(outs)

    def accepts_input(self, module: nn.Module, input_shape: tuple[int, ...]) -> bool:
        """``Conv2d`` on one ``[C_in, H, W]`` image, one group, numeric zero padding."""
        conv: Any = module
        return (
            self.spatial_dims == 2
            and len(input_shape) == 3
            and input_shape[0] == conv.in_channels
            and conv.groups == 1
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
        )

    def input_columns(self, module: nn.Module, input_shape: tuple[int, ...]) -> InputColumns:
        """Unfold an image of (pixel index + 1), exact in float64.

        Entry ``(k, l)`` names the pixel at kernel offset ``k`` of output position ``l``
        (0: zero padding).
        """
        conv: Any = module
        d = math.prod(input_shape)
        cpu = torch.device("cpu")  # index tensors: built here, moved by the caller
        img = torch.arange(1, d + 1, dtype=torch.float64, device=cpu).reshape(1, *input_shape)
        cols = unfold_input(module, img)[0]
        kk, ll = (cols > 0).nonzero(as_tuple=True)
        pix = cols[kk, ll].long() - 1
        probe = F.conv2d(
            torch.zeros(1, *input_shape, device=cpu),
            torch.zeros(conv.out_channels, *conv.weight.shape[1:], device=cpu),
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
        )
        return pix, kk, ll, int(cols.shape[1]), tuple(probe.shape[1:])
