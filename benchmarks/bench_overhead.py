"""Wall-time overhead of the probes on the quickstart run (digits MLP), in one process.

Trains the quickstart model with no probe, with each probe alone (at its defaults and at the
quickstart's settings), and with all of them together; prints each run's time and its ratio to
the no-probe run (median of ``--repeats`` interleaved repeats).

    .venv/bin/python benchmarks/bench_overhead.py [--epochs 10] [--repeats 3] [--defaults-only]

``--epochs 200 --defaults-only`` shows the budgets on a run long enough for the probes to run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from digits import DigitsMLP, digits_loaders  # noqa: E402
from quickstart import QUICKSTART_PROBES  # noqa: E402

import lightning_probes  # noqa: E402
from lightning_probes.callbacks.base import ProbeCallback  # noqa: E402

DEFAULTS: dict[str, Callable[[], pl.Callback]] = {
    name: (lambda name=name: getattr(lightning_probes, name)()) for name in QUICKSTART_PROBES
}


def train(callbacks: list[pl.Callback], epochs: int, logdir: str) -> float:
    pl.seed_everything(0, verbose=False)
    train_loader, val_loader = digits_loaders()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(logdir, name="bench"),
        callbacks=callbacks,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DigitsMLP()
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="skip the quickstart settings (every scheduled run: slow on long runs)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    configs: dict[str, Callable[[], list[pl.Callback]]] = {"no probes": lambda: []}
    for name in QUICKSTART_PROBES:
        configs[f"{name} (defaults)"] = lambda name=name: [DEFAULTS[name]()]
    configs["all (defaults)"] = lambda: [f() for f in DEFAULTS.values()]
    if not args.defaults_only:
        for name, factory in QUICKSTART_PROBES.items():
            configs[f"{name} (quickstart)"] = lambda factory=factory: [factory()]
        configs["all (quickstart)"] = lambda: [f() for f in QUICKSTART_PROBES.values()]

    times: dict[str, list[float]] = {k: [] for k in configs}
    shares: dict[str, list[float]] = {k: [] for k in configs}
    runs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as logdir:
        train([], 1, logdir)  # warm-up: imports, allocator, first TensorBoard writer
        for _ in range(args.repeats):
            for label, make in configs.items():
                callbacks = make()
                wall = train(callbacks, args.epochs, logdir)
                probes = [c for c in callbacks if isinstance(c, ProbeCallback)]
                spent = sum(c.probe_seconds for c in probes)
                times[label].append(wall)
                # the probes' own clock: immune to the machine's noise on the training part
                shares[label].append(spent / max(wall - spent, 1e-9))
                # runs done / skipped to stay within the budget, per probe (last repeat)
                runs[label] = " ".join(f"{c.runs}/{c.over_budget_skips}" for c in probes)
    base = statistics.median(times["no probes"])
    print(f"\nquickstart run: {args.epochs} epochs of digits, median of {args.repeats} repeats\n")
    header = f"{'configuration':<42}{'seconds':>9}{'wall ratio':>12}{'probe share':>13}"
    print(f"{header}   runs/skipped (per probe)")
    for label, values in times.items():
        t, share = statistics.median(values), statistics.median(shares[label])
        print(f"{label:<42}{t:>9.2f}{t / base:>11.2f}x{share:>12.1%}   {runs.get(label, '')}")
    print(
        "\nwall ratio: wall time of `trainer.fit` over the no-probe run's (noisy on a shared"
        "\nmachine); probe share: the probes' own measured time (fit-start work, cost"
        "\npredictions, runs) over the rest of the run; runs/skipped: scheduled runs done, and"
        "\nskipped to stay within `max_overhead`."
    )
    ratio = statistics.median(times["all (defaults)"]) / base
    share = statistics.median(shares["all (defaults)"])
    verdict = "met" if ratio <= 1.25 else "NOT met"
    print(
        f"all probes together at their defaults: {ratio:.2f}x wall time, probes' own time "
        f"{share:.1%} of the run (target <= 1.25x: {verdict})"
    )


if __name__ == "__main__":
    main()
