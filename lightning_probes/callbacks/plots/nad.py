"""Figures, images and histograms of :class:`~lightning_probes.callbacks.nad.NADCallback`.

Ortiz-Jiménez et al. (NeurIPS 2020), Figs. 1-2: the first NADs in the pixel and Fourier
domains, the spectrum of singular values, and how the energy of the probe data and of the
network's input gradients spreads over the NAD indices.
"""

from __future__ import annotations

import torch
from pytorch_lightning import Trainer
from torch import Tensor

from lightning_probes import logging as plog


def log_spectrum_figure(trainer: Trainer, key: str, singular_values: Tensor) -> None:
    """Figure ``key``: the NADs' singular values against their index (log scale)."""
    fig = plog.new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(plog.as_numpy(singular_values), marker=".", lw=1)
    ax.set(xlabel="NAD index", ylabel="singular value", title="NAD spectrum")
    plog.log_figure(trainer, key, fig)


def log_energy_figure(trainer: Trainer, key: str, data_share: Tensor, grad_share: Tensor) -> None:
    """Figure ``key``: the share of energy per NAD index of the probe data and input gradients."""
    fig = plog.new_figure()
    ax = fig.add_subplot(1, 1, 1)
    ax.semilogy(plog.as_numpy(data_share), label="probe data", lw=1)
    ax.semilogy(plog.as_numpy(grad_share), label="input gradients", lw=1)
    ax.set(xlabel="NAD index", ylabel="share of energy", title="Energy over NADs")
    ax.legend()
    plog.log_figure(trainer, key, fig)


def nad_images(directions: Tensor) -> tuple[Tensor, Tensor]:
    r"""Pixel and Fourier-magnitude images of ``(n, *input_shape)`` NADs, each ``[C, H, W]``.

    ``(C, H, W)`` / ``(H, W)`` inputs: grids of images (Fourier: :math:`|\mathrm{fftshift}
    (\mathrm{fft2}(u))|` averaged over channels, DC in the centre); other shapes: one image
    whose rows are the flattened NADs (Fourier: :math:`|\mathrm{fft}(u)|`, DC at the left).
    """
    n = directions.shape[0]
    shape = directions.shape[1:]
    if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
        images = directions.reshape(n, -1, *shape[-2:])
        spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1)).abs().mean(1, True)
        return plog.image_grid(images), plog.image_grid(spectrum)
    flat = directions.reshape(n, -1)
    return flat[None], torch.fft.fft(flat).abs()[None]


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
