"""The README's gallery: one figure per probe, from one small real run on the digits.

Trains a small MLP on scikit-learn's 8×8 digits (as 1×8×8 images, so that the NADs are images)
for a few epochs on the CPU with every probe attached, logs to TensorBoard in a temporary
folder, and writes the last image of one figure per probe, exactly as TensorBoard received it,
to ``<out>/<probe>.png`` (100 dpi). About half a minute on a 2-core CPU; ``--quick`` (a
smoke test: fewer steps, coarser grids) takes a few seconds.

    .venv/bin/python examples/gallery.py [docs/gallery] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import digits_datasets

from lightning_probes import (
    AblationAUCCallback,
    LandscapeCallback,
    LayerCKACallback,
    LossContributionCallback,
    NADCallback,
    SelectivityCallback,
)

GALLERY = {
    "ablation": "probes/ablation/curve",
    "selectivity": "probes/selectivity/importance_scatter",
    "cka": "probes/cka/alignment_hierarchy",
    "nad": "probes/nad/directions",
    "lca": "probes/lca/cumulative_by_layer",
    "landscape": "probes/landscape/plane_radial_contour",
}
"""``{file stem: TensorBoard tag}``: the figure of each probe the gallery shows."""


class DigitsNet(pl.LightningModule):
    """An MLP (64 → 128 → 64 → 32 → 10, ReLU) on 1×8×8 digit images, Adam.

    Fully connected: cheap for every probe on a CPU; its NADs are nearly isotropic (the
    paper's Fig. 1 contrasts such networks with CNNs, whose NADs are structured).
    """

    def __init__(self, hidden: tuple[int, ...] = (128, 64, 32), lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def images(dataset: TensorDataset) -> TensorDataset:
    """The digits' 64 pixels as ``[n, 1, 8, 8]`` images."""
    x, y = dataset.tensors
    return TensorDataset(x.reshape(-1, 1, 8, 8), y)


def make_probes(steps: int) -> list[pl.Callback]:
    """Every probe, at CPU-cheap settings: curves at the last step, histories every quarter."""
    every, last = steps // 4, [steps]
    return [
        AblationAUCCallback(num_orderings=5, probe_size=256, at_steps=last, max_overhead=None),
        SelectivityCallback(importance=True, probe_size=256, at_steps=last, max_overhead=None),
        LayerCKACallback(every_n_steps=every, probe_size=32, stable_rank=False, max_overhead=None),
        NADCallback(num_networks=40 if steps < 50 else 100, at_steps=last, max_overhead=None),
        LossContributionCallback(
            method="simpson", every_n_steps=every, window=3, probe_size=256, max_overhead=None
        ),
        LandscapeCallback(
            at_steps=last,
            planes=("radial",),
            plane_span=1.5,
            plane_resolution=7 if steps < 50 else 17,
            probe_size=128,
            max_overhead=None,
        ),
    ]


def export_last_images(log_dir: str, out: Path, tags: dict[str, str]) -> dict[str, Path]:
    """Write the last PNG logged under each tag to ``out/<stem>.png``; returns the paths."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"images": 1})
    acc.Reload()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem, tag in tags.items():
        events = acc.Images(tag) if tag in acc.Tags()["images"] else []
        if not events:
            raise RuntimeError(
                f"Expected a figure under {tag!r}; got images {acc.Tags()['images']}"
            )
        path = out / f"{stem}.png"
        path.write_bytes(events[-1].encoded_image_string)
        written[stem] = path
    return written


def main(out: Path = Path("docs/gallery"), *, quick: bool = False) -> dict[str, Path]:
    """Train with every probe and write the gallery to ``out``; returns ``{stem: path}``."""
    pl.seed_everything(0, verbose=False)
    train, _ = digits_datasets()
    loader = DataLoader(images(train), batch_size=64, shuffle=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints about workers and loggers
        logger = TensorBoardLogger(tmp, name="gallery")
        steps = 20 if quick else 100
        trainer = pl.Trainer(
            max_steps=steps, logger=logger, callbacks=make_probes(steps),
            accelerator="cpu", devices=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(DigitsNet(), loader)
        for probe in trainer.callbacks:  # type: ignore[attr-defined]
            if hasattr(probe, "probe_seconds"):
                print(f"{type(probe).__name__:26s} {probe.probe_seconds:6.1f} s")
        return export_last_images(logger.log_dir, out, GALLERY)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="docs/gallery", type=Path)
    parser.add_argument("--quick", action="store_true", help="a few seconds, coarse figures")
    args = parser.parse_args()
    start = time.perf_counter()
    paths = main(args.out, quick=args.quick)
    for stem, path in paths.items():
        print(f"{stem:12s} {path}  {path.stat().st_size / 1024:.0f} KiB")
    print(f"{len(paths)} figures in {time.perf_counter() - start:.1f} s")
