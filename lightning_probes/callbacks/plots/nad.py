"""Figures, images and histograms of :class:`~lightning_probes.callbacks.nad.NADCallback`.

Ortiz-Jiménez et al. (NeurIPS 2020), Figs. 1-2: the first NADs in the pixel and Fourier
domains, the spectrum of singular values, and how the energy of the probe data and of the
network's input gradients spreads over the NAD indices.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog
from lightning_probes.callbacks.plots.style import (
    DIVERGING,
    color_norm,
    labelled_colorbar,
    legend_outside,
    masked_cmap,
    styled_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def log_spectrum_figure(trainer: Trainer, key: str, singular_values: Tensor) -> None:
    """Figure ``key``: the NADs' singular values against their index (log scale)."""
    plog.log_figure(trainer, key, spectrum_figure(singular_values))


def spectrum_figure(singular_values: Tensor) -> Figure:
    """The NADs' singular values against their index, on a log axis."""
    fig = styled_figure(5.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(plog.as_numpy(singular_values), marker=".", lw=1)
    ax.set(xlabel="NAD index", ylabel="singular value", title="NAD spectrum")
    return fig


def log_energy_figure(trainer: Trainer, key: str, data_share: Tensor, grad_share: Tensor) -> None:
    """Figure ``key``: the share of energy per NAD index of the probe data and input gradients."""
    plog.log_figure(trainer, key, energy_figure(data_share, grad_share, trainer.global_step))


def energy_figure(data_share: Tensor, grad_share: Tensor, step: int) -> Figure:
    """Share of energy per NAD index (log axis) of the probe data and the input gradients."""
    fig = styled_figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(plog.as_numpy(data_share), label="probe data", lw=1)
    ax.semilogy(plog.as_numpy(grad_share), label="input gradients", lw=1)
    ax.set(xlabel="NAD index", ylabel="share of energy", title=f"step {step}: energy over NADs")
    legend_outside(ax)
    return fig


def log_direction_images(
    trainer: Trainer, pixel_key: str, fourier_key: str, directions: Tensor, *, figure: bool
) -> None:
    """Log the first NADs in the pixel and Fourier domains, each on one shared scale.

    Args:
        trainer: Where they go (rank zero).
        pixel_key: Key of the pixel-domain grid.
        fourier_key: Key of the Fourier-magnitude grid.
        directions: ``[k, *input_shape]`` the NADs to show.
        figure: Draw figures with labelled colour bars (matplotlib present); else images.
    """
    pixel, fourier = nad_images(directions)
    if not figure:
        plog.log_image(trainer, pixel_key, _upscale(pixel))
        plog.log_image(trainer, fourier_key, _upscale(fourier))
        return
    grids = nad_grids(directions)
    plog.log_figure(trainer, pixel_key, directions_figure(grids[0], "pixel", grids[2]))
    plog.log_figure(trainer, fourier_key, directions_figure(grids[1], "fourier", grids[2]))


def nad_images(directions: Tensor) -> tuple[Tensor, Tensor]:
    r"""Pixel and Fourier-magnitude images of ``(n, *input_shape)`` NADs, each ``[1, H, W]``.

    ``(C, H, W)`` / ``(H, W)`` inputs: grids of tiles (channels side by side; Fourier:
    :math:`|\mathrm{fftshift}(\mathrm{fft2}(u))|` averaged over channels, DC in the centre);
    other shapes: one image whose rows are the flattened NADs (Fourier: :math:`|\mathrm{fft}
    (u)|`, DC at the left). Every tile is on one shared scale (no per-tile rescaling); gaps
    between tiles take the grid's smallest value (the pixel grid's values are symmetric
    about 0 only up to that).
    """
    pixel, fourier, _ = nad_grids(directions)
    return _fill(pixel)[None], _fill(fourier)[None]


def nad_grids(directions: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(pixel grid, Fourier grid, tiled)``, raw values with NaN between tiles.

    Args:
        directions: ``[k, *input_shape]`` NADs.

    Returns:
        Two ``[H', W']`` float64 grids and whether they are tiles (image-shaped inputs) or rows
        of flattened NADs.
    """
    n = directions.shape[0]
    shape = directions.shape[1:]
    u = directions.detach().double().cpu()
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        images = u.reshape(n, -1, *shape[-2:])
        spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1)).abs().mean(1)
        side_by_side = images.permute(0, 2, 1, 3).reshape(n, shape[-2], -1)  # channels in a row
        return tile_grid(side_by_side), tile_grid(spectrum), True
    flat = u.reshape(n, -1)
    return flat, torch.fft.fft(flat).abs(), False


def tile_grid(tiles: Tensor, ncol: int | None = None) -> Tensor:
    """Tile ``[k, H, W]`` into one ``[H', W']`` grid of raw values, NaN in the one-pixel gaps."""
    k, h, w = tiles.shape
    ncol = ncol or math.ceil(math.sqrt(k))
    nrow = math.ceil(k / ncol)
    grid = torch.full(
        (nrow * (h + 1) - 1, ncol * (w + 1) - 1), math.nan, dtype=tiles.dtype, device=tiles.device
    )
    for idx in range(k):
        r, c = divmod(idx, ncol)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = tiles[idx]
    return grid


def directions_figure(grid: Tensor, domain: str, tiled: bool) -> Figure:
    """A grid from :func:`nad_grids` on one shared colour scale, with a labelled colour bar.

    Args:
        grid: ``[H', W']`` raw values (NaN: gaps, drawn white).
        domain: ``"pixel"`` (symmetric diverging scale ``[-m, m]``, ``m`` the largest
            magnitude over all tiles) or ``"fourier"`` (magnitudes; log where they span decades).
        tiled: Tiles of images (else rows of flattened NADs).

    Returns:
        The figure.
    """
    g = plog.as_numpy(grid)
    finite = g[np.isfinite(g)]
    rows, cols = g.shape
    fig = styled_figure(6.5, min(7.0, 1.2 + 5.0 * rows / cols)) if tiled else styled_figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    if domain == "pixel":
        norm, cmap = color_norm(finite, symmetric=True), DIVERGING
        label, title = "NAD entry $u_i$ (one scale for all tiles)", "first NADs (pixel domain)"
    else:
        norm, cmap = color_norm(finite), "magma"
        label, title = "|DFT of NAD| (one scale for all tiles)", "first NADs (Fourier magnitude)"
    shown = ax.imshow(
        np.ma.masked_invalid(g), cmap=masked_cmap(cmap).with_extremes(bad="white"), norm=norm,
        interpolation="nearest", aspect="equal" if tiled else "auto",
    )  # fmt: skip
    labelled_colorbar(fig, shown, ax, label)
    if tiled:
        ax.set_axis_off()
        ax.set_title(f"{title}, index 0 at top left, row by row", fontsize="medium")
    else:
        ax.set(xlabel="input coordinate" if domain == "pixel" else "frequency index")
        ax.set(ylabel="NAD index", title=title)
    return fig


def _fill(grid: Tensor) -> Tensor:
    """NaN gaps set to the grid's smallest value."""
    finite = grid[torch.isfinite(grid)]
    low = float(finite.min()) if finite.numel() else 0.0
    return torch.nan_to_num(grid, nan=low).float()


def _upscale(image: Tensor, least: int = 256) -> Tensor:
    """``[C, H, W]`` enlarged by an integer factor (nearest) so its longer side is >= ``least``."""
    factor = max(1, math.ceil(least / max(image.shape[-2:])))
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def log_index_histogram(trainer: Trainer, key: str, weights: Tensor) -> None:
    """A TensorBoard histogram over NAD indices, bucket ``i`` holding ``weights[i]``."""
    if not trainer.is_global_zero:
        return
    w = weights.detach().double().cpu()
    index = torch.arange(w.numel(), dtype=torch.float64, device="cpu")
    for writer in plog.tensorboard_writers(trainer):
        writer.add_histogram_raw(
            key,
            min=0.0,
            max=float(w.numel() - 1),
            num=float(w.sum()),
            sum=float((index * w).sum()),
            sum_squares=float((index.square() * w).sum()),
            bucket_limits=(index + 0.5).tolist(),
            bucket_counts=w.tolist(),
            global_step=trainer.global_step,
        )
