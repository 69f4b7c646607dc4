"""Every probe's figures fit a paper: no text clipped, labelled colour bars, fitting scales.

Each probe's figures are built through its public ``log_*`` functions (the ones the callbacks
call) with realistic data: 13 layers with long names, values spanning many decades, a loss
plane up to 1e11. ``plog.log_figure`` is replaced by a catcher, so nothing needs a logger.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.colors import LogNorm
from matplotlib.image import AxesImage
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from lightning_probes import logging as plog

NAMES = [f"encoder.layers.{i}.self_attention.output_projection" for i in range(13)]
TRAINER = SimpleNamespace(global_step=12_345, is_global_zero=True, loggers=[])


def key(quantity: str, layer: str | None = None) -> str:
    return plog.metric_key("probe", quantity, layer)


@pytest.fixture
def caught(monkeypatch):
    """``{key: figure or image}`` of everything the plotting functions log."""
    out: dict[str, object] = {}
    monkeypatch.setattr(plog, "log_figure", lambda trainer, k, fig: out.setdefault(k, fig))
    monkeypatch.setattr(plog, "log_image", lambda trainer, k, img: out.setdefault(k, img))
    return out


def ablation() -> None:
    from lightning_probes.callbacks.plots.ablation import log_ablation_figures
    from lightning_probes.core.interventions.ablation import AblationCurve, NoiseCurve

    x = torch.linspace(0, 1, 21, dtype=torch.float64)
    acc = (1 - x**2).expand(5, 21) * torch.linspace(0.9, 1.0, 5, dtype=torch.float64)[:, None]
    curve = AblationCurve(
        fractions=x, counts=(x * 1000).long(), accuracy=acc, mean=acc.mean(0), std=acc.std(0),
        auc=torch.tensor(0.6, dtype=torch.float64), normalized_auc=torch.tensor(0.63),
        orderings=torch.zeros(5, 1000, dtype=torch.long), num_units={n: 77 for n in NAMES},
    )  # fmt: skip
    s = torch.logspace(-2, 1, 8, dtype=torch.float64)
    acc = torch.exp(-s).expand(3, 8)
    noise = NoiseCurve(scales=s, accuracy=acc, mean=acc.mean(0), std=acc.std(0))
    log_ablation_figures(TRAINER, curve, noise)  # type: ignore[arg-type]


def cka() -> None:
    from lightning_probes.callbacks.plots.cka import log_alignment_figures

    history = np.logspace(-4, -0.3, 13)[None, :] * np.linspace(0.5, 1, 30)[:, None]
    history[3, 5] = np.nan  # undefined at one run
    steps = list(range(0, 30_000, 1000))
    log_alignment_figures(TRAINER, key, steps, history, NAMES)  # type: ignore[arg-type]


def cka_kernel() -> None:
    from lightning_probes.callbacks.plots.cka import log_kernel

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 10, (300,), generator=g)
    feats = torch.randn(300 * 10, 40, generator=g, dtype=torch.float64)
    kernel = feats @ feats.T
    log_kernel(TRAINER, key("kernel", NAMES[-1]), kernel, targets, "samples", figure=True)  # type: ignore[arg-type]


def plane(low: float = 0.05, high: float = 9.5e10):
    from lightning_probes.core.landscape.planes import LossPlane

    a = torch.linspace(-1.5, 1.5, 25, dtype=torch.float64)
    r2 = a[None, :] ** 2 + a[:, None] ** 2
    losses = low * (high / low) ** (r2 / r2.max())
    return LossPlane(alphas=a, betas=a.clone(), losses=losses)


def landscape() -> None:
    from lightning_probes.callbacks.plots.landscape import log_plane, log_segments

    for kind in ("radial", "random"):
        log_plane(TRAINER, key, kind, plane(), figures=True)  # type: ignore[arg-type]
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    curves = [(step, t, 0.1 + 10.0 ** (3 * t * (1 - t)) * k) for k, step in enumerate(range(5))]
    log_segments(TRAINER, key, curves)  # type: ignore[arg-type]


def lca() -> None:
    from lightning_probes.callbacks.plots.lca import log_artefacts

    g = torch.Generator().manual_seed(0)
    layer_of, lc, cumulative = {}, {}, {}
    for i, name in enumerate(NAMES):
        layer_of[f"{name}.weight"] = name
        lc[f"{name}.weight"] = torch.randn(16, 8, generator=g) * 10.0 ** (-i / 2)
        cumulative[f"{name}.weight"] = lc[f"{name}.weight"] * 40 - 10.0 ** (-i / 2)
    steps = torch.arange(100, 160, dtype=torch.float64)
    loss = 2.3 * torch.exp(-steps / 10 + 10)
    history = torch.stack([steps, loss, loss * 0.9, -loss * 0.1], 1)
    log_artefacts(
        TRAINER, key, lc, cumulative, layer_of, history, per_neuron=False, figures=True, seed=0
    )  # type: ignore[arg-type]


def nad() -> None:
    from lightning_probes.callbacks.plots.nad import log_energy_figure, log_spectrum_figure

    log_spectrum_figure(TRAINER, key("spectrum"), torch.logspace(2, -6, 1000))  # type: ignore[arg-type]
    share = torch.logspace(-1, -9, 1000)
    log_energy_figure(TRAINER, key("energy"), share / share.sum(), share.flip(0) / share.sum())  # type: ignore[arg-type]


def nad_directions() -> None:
    from lightning_probes.callbacks.plots.nad import log_direction_images

    u = directions()
    log_direction_images(TRAINER, key("directions"), key("directions_fourier"), u, figure=True)  # type: ignore[arg-type]


def directions() -> torch.Tensor:
    """16 NAD-like directions of 3×32×32 images, with magnitudes over four decades."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(16, 3, 32, 32, generator=g)
    return u * torch.logspace(0, -4, 16)[:, None, None, None]


def selectivity() -> None:
    from lightning_probes.callbacks.plots.selectivity import log_importance_scatter

    g = torch.Generator().manual_seed(0)
    si = {n: torch.rand(64, generator=g) for n in NAMES}
    impact = {n: torch.randn(64, generator=g) * 10.0 ** (-i / 2) for i, n in enumerate(NAMES)}
    log_importance_scatter(TRAINER, si, impact)  # type: ignore[arg-type]


PROBES = {
    f.__name__: f
    for f in (ablation, cka, cka_kernel, landscape, lca, nad, nad_directions, selectivity)
}


def drawn_texts(fig, monkeypatch) -> list[Text]:
    """Every non-empty text the figure draws (tick labels out of view are not drawn)."""
    drawn: list[Text] = []
    draw = Text.draw

    def spy(self, renderer):
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return draw(self, renderer)

    with monkeypatch.context() as m:
        m.setattr(Text, "draw", spy)
        fig.canvas.draw()
    return drawn


@pytest.mark.parametrize("probe", PROBES)
def test_no_text_is_clipped_and_colour_bars_are_labelled(probe, caught, monkeypatch):
    PROBES[probe]()
    figures = {k: f for k, f in caught.items() if not isinstance(f, torch.Tensor)}
    assert figures, caught
    for name, fig in figures.items():
        texts = drawn_texts(fig, monkeypatch)
        assert any(t.get_text() for t in texts), name
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        for text in texts:
            bb = text.get_window_extent(renderer)
            inside = (
                bb.x0 >= box.x0 - 1 and bb.y0 >= box.y0 - 1
                and bb.x1 <= box.x1 + 1 and bb.y1 <= box.y1 + 1
            )  # fmt: skip
            assert inside, f"{name}: {text.get_text()!r} at {bb.bounds} outside {box.bounds}"
        for cax in (ax for ax in fig.axes if ax.get_label() == "<colorbar>"):
            assert cax.get_ylabel() or cax.get_xlabel(), f"{name}: a colour bar has no label"
        for ax in (ax for ax in fig.axes if ax.get_legend() is not None):
            legend = ax.get_legend().get_window_extent(renderer)
            overlap = Bbox.intersection(legend, ax.get_window_extent(renderer))
            assert overlap is None or overlap.width * overlap.height < 1, f"{name}: legend on data"


def _norms(fig) -> list:
    return [m.norm for ax in fig.axes for m in [*ax.images, *ax.collections] if m.norm]


def test_values_spanning_decades_get_a_log_colour_scale(caught):
    landscape()
    cka()
    nad_directions()
    for k in (key("plane_radial_contour"), key("alignment_hierarchy"), key("directions_fourier")):
        assert any(isinstance(n, LogNorm) for n in _norms(caught[k])), k
    assert caught[key("plane_radial_contour")].axes[0].collections[0].norm.vmax == pytest.approx(
        9.5e10
    )


def test_values_within_a_decade_keep_a_linear_colour_scale(caught):
    from lightning_probes.callbacks.plots.landscape import log_plane

    log_plane(TRAINER, key, "random", plane(0.5, 2.0), figures=True)  # type: ignore[arg-type]
    assert not any(isinstance(n, LogNorm) for n in _norms(caught[key("plane_random_contour")]))


def test_nad_tiles_share_one_symmetric_scale_and_are_large(caught):
    nad_directions()
    fig = caught[key("directions")]
    images = [m for ax in fig.axes for m in ax.images]
    assert len(images) == 1 and isinstance(images[0], AxesImage)
    u = directions().double()
    m = float(u.abs().max())
    norm = images[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((-m, m))  # one scale, centred on zero
    grid = np.ma.getdata(images[0].get_array())
    # tile 5 (row 1, column 1 of a 4x4 grid) holds NAD 5's raw values, channels side by side
    h, w = 32, 32 * 3
    tile = grid[h + 1 : 2 * h + 1, w + 1 : 2 * w + 1]
    np.testing.assert_allclose(tile, u[5].permute(1, 0, 2).reshape(32, 96).numpy(), rtol=1e-6)
    fig.canvas.draw()
    width = images[0].get_window_extent(fig.canvas.get_renderer()).width
    assert width / 4 >= 60, f"tiles are {width / 4:.0f} px wide"


def test_nad_image_fallback_shares_one_scale_and_is_upscaled(caught):
    from lightning_probes.callbacks.plots.nad import log_direction_images

    u = directions()[:, :1]
    log_direction_images(TRAINER, "pixel", "fourier", u, figure=False)  # type: ignore[arg-type]
    img = caught["pixel"]
    assert min(img.shape[-2:]) >= 128  # type: ignore[union-attr]
    factor = img.shape[-1] // (4 * 33 - 1)  # type: ignore[union-attr]
    tile0 = img[0, : 32 * factor : factor, : 32 * factor : factor]  # type: ignore[index]
    tile15 = img[
        0,
        3 * 33 * factor : (3 * 33 + 32) * factor : factor,
        3 * 33 * factor : (3 * 33 + 32) * factor : factor,
    ]  # type: ignore[index]
    # one affine map for every tile: the small tile 15 is nearly flat next to tile 0
    assert float(tile15.std()) < 1e-3 * float(tile0.std())
    assert math.isfinite(float(img.sum()))  # type: ignore[union-attr]


def test_selectivity_colours_and_markers_distinguish_thirteen_layers(caught):
    selectivity()
    ax = caught["probes/selectivity/importance_scatter"].axes[0]
    styles = {
        (tuple(np.round(c.get_facecolor()[0], 3)), c.get_paths()[0].vertices.tobytes())
        for c in ax.collections
    }
    assert len(ax.collections) == 13 and len(styles) == 13
