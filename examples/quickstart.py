"""Quickstart: train a small MLP on digits with every probe attached, then open TensorBoard.

Run with ``make demo`` (or ``python examples/quickstart.py`` inside the venv). Takes well under
two minutes on a 2-core CPU and writes TensorBoard logs under ``lightning_logs/quickstart``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsMLP, digits_loaders

from lightning_probes import (
    AblationAUCCallback,
    LandscapeCallback,
    LayerCKACallback,
    LossContributionCallback,
    NADCallback,
    SelectivityCallback,
)

# name -> factory of each probe as the quickstart attaches it (cheap settings for a CPU demo).
# benchmarks/bench_overhead.py times the same run with each of these alone and all together.
# The demo shows every scheduled run of every probe (max_overhead=None: no wall-time budget),
# at settings chosen to keep it cheap.
QUICKSTART_PROBES: dict[str, Callable[[], pl.Callback]] = {
    "LossContributionCallback": lambda: LossContributionCallback(
        method="simpson", every_n_steps=50, window=4, probe_size=256, max_overhead=None
    ),
    "AblationAUCCallback": lambda: AblationAUCCallback(
        num_orderings=5, num_points=11, probe_size=256, max_overhead=None
    ),
    "SelectivityCallback": lambda: SelectivityCallback(
        probe_size=256, importance=True, max_overhead=None
    ),
    "LayerCKACallback": lambda: LayerCKACallback(
        every_n_steps=50, probe_size=128, max_overhead=None
    ),
    "NADCallback": lambda: NADCallback(num_networks=1000, every_n_steps=100, max_overhead=None),
    "LandscapeCallback": lambda: LandscapeCallback(
        every_n_steps=50, plane_every_n_runs=2, max_overhead=None
    ),
}


def make_probes() -> list[pl.Callback]:
    """Every probe the library has, at settings cheap enough for a CPU demo."""
    return [factory() for factory in QUICKSTART_PROBES.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    logger = TensorBoardLogger(args.logdir, name="quickstart")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=make_probes(),
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(DigitsMLP(), train, val)
    print(f"\nTrained {trainer.global_step} steps in {time.perf_counter() - start:.1f} s.")
    print(f"Logs: {logger.log_dir}")
    print("Open them with:\n")
    print(f"    .venv/bin/tensorboard --logdir {Path(args.logdir).as_posix()}\n")


if __name__ == "__main__":
    main()
