"""Benchmark: each probe at its defaults on a ResNet-18 and a GPT-2, against its method's minimum.

Models (built here, no download): a torchvision-style ResNet-18 for 3x32x32 inputs (CIFAR stem,
``--width`` channels in the first stage; 64 is torchvision's) with a probe set of 256, trained
on batches of 128; HF ``GPT2LMHeadModel`` from a config (4 layers, width 256, 4 heads, 64
tokens, vocabulary 100) with a probe set of 64 sequences, trained on batches of 16; HF
``BertForSequenceClassification`` (4 layers, width 128, feed-forward 512 with ReLU units, 32
tokens with attention masks, 10 classes, dict batches) with a probe set of 64, batches of 16.
Selectivity on BERT reads the feed-forward ReLU units (``layers=BERT_UNITS``): its defaults
include the pooler's tanh, which selectivity refuses (a negative activity).

For each probe (its callback at its default settings, ``max_overhead=None``, in a real
``Trainer``) the benchmark prints the seconds of one run (the last of ``--runs``), that cost in
training steps of the same model (a real forward, backward and optimizer step, timed here), and
its ratio to what the method must compute, measured in the same process:

- ``lca-simpson``: two gradient evaluations on the LCA set; ``lca`` (adaptive, the default):
  ``splits + 1`` gradient evaluations, the splits its tolerance rule chose in the last run
  (capped at 8; Simpson's 2 when the rule needs no refinement);
- ``cka`` (layer tangent kernels): one forward, ``o`` backward passes of the probe set, plus the
  Gram products' flops at the matmul rate measured here: per layer the cheaper of ``(n·o)²·P``
  through per-sample gradients and ``n²t(t·k + t·o·m + o²·m)`` through the forward Gram of the
  layer's ``t`` positions (``k`` inputs, ``m`` outputs), counted as multiply-adds of the full
  product (a symmetric product computes about half of them);
- ``ablation``: one forward of the ablated suffix (from the first ablated point on) per distinct
  mask (``orderings × (points - 2) + 2``), plus one forward of the prefix;
- ``selectivity`` (default, ``importance=False``): one forward of the probe set;
- ``importance`` (``importance=True``): one forward of each unit's suffix per unit (units are
  batched, so this is the batched throughput), plus the plain selectivity forward;
- ``landscape``: plane points (2 planes x 11 x 11) x one forward of the probe set;
- ``nad`` (secant basis, ResNet only): ``2·d`` single-sample forwards per network at batched
  throughput; timed on ``--nad-networks`` networks and scaled to the default 256.

Targets (printed, not asserted): every probe within 2x its minimum on both models.
GPT-2's CKA uses the last position's logits (``output_fn=lambda out: out[:, -1]``, o = 100
outputs) or, by default, the class-subset recipe (``out[:, -1, :10]``): ``--gpt2-outputs``.
Run: ``python benchmarks/bench_real_models.py [--models resnet gpt2 bert] [--probes ...]
[--quick]``.
The machine may be shared: read the ratios (measured in one process), not absolute times.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from real_models_setup import (
    BERT_UNITS,
    NullLogger,
    ResNet18,
    bert_model,
    class_token_loader,
    gpt2_model,
    image_loader,
    minimum,
    nad,
    token_loader,
)
from torch.utils.data import DataLoader

import lightning_probes as lp

PROBES = ("lca", "lca-simpson", "cka", "ablation", "selectivity", "importance", "landscape", "nad")


def make_probe(name: str, model: str, size: int, gpt2_outputs: int) -> pl.Callback:
    """The probe's callback at its defaults (every step, no budget, errors raised)."""
    common: dict[str, Any] = {
        "probe_size": size, "every_n_steps": 1, "max_overhead": None, "on_error": "raise"
    }  # fmt: skip
    if name == "lca":
        return lp.LossContributionCallback(**common)
    if name == "lca-simpson":
        return lp.LossContributionCallback(method="simpson", **common)
    if name == "cka":
        extra: dict[str, Any] = {}
        if model == "gpt2":  # the last position's logits, the first `gpt2_outputs` of them,
            # and one label per sample: the next token at the end (README, "Real models")
            extra["output_fn"] = last_position if gpt2_outputs == 100 else first_ten_logits
            extra["batch_to_inputs_targets"] = lambda b: (
                b["input_ids"],
                b["labels"][:, -1] % gpt2_outputs,  # a class of the selected subset
            )
        return lp.LayerCKACallback(**common, **extra)
    if name == "ablation":
        return lp.AblationAUCCallback(**common)
    units = {"layers": BERT_UNITS} if model == "bert" else {}
    if name == "selectivity":
        return lp.SelectivityCallback(**units, **common)
    if name == "importance":
        return lp.SelectivityCallback(importance=True, **units, **common)
    if name == "landscape":
        return lp.LandscapeCallback(**common)
    raise ValueError(name)


def last_position(out: torch.Tensor) -> torch.Tensor:
    return out[:, -1]


def first_ten_logits(out: torch.Tensor) -> torch.Tensor:
    return out[:, -1, :10]


def timed_runs(module: pl.LightningModule, loader: DataLoader, probe: pl.Callback, runs: int):
    """Seconds of each run of ``probe`` during a fit of ``runs`` steps."""
    seconds: list[float] = []
    inner = probe.probe  # type: ignore[attr-defined]

    def probe_timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        inner(*args, **kwargs)
        seconds.append(time.perf_counter() - start)

    probe.probe = probe_timed  # type: ignore[attr-defined]
    trainer = pl.Trainer(
        max_steps=runs, callbacks=[probe], logger=NullLogger(), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, loader)
    return seconds


def train_step_seconds(module: pl.LightningModule, loader: DataLoader, repeats: int) -> float:
    """Median seconds of one real training step (forward, backward, optimizer step)."""
    model = copy.deepcopy(module).train()
    optimizer = model.configure_optimizers()
    batch = next(iter(loader))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(name: str, args: argparse.Namespace) -> tuple[Callable[[], pl.LightningModule], Any]:
    if name == "resnet":
        return (lambda: ResNet18(args.width)), image_loader(512, 128)
    if name == "bert":
        return bert_model, class_token_loader(256, 16)
    return gpt2_model, token_loader(256, 16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["resnet", "gpt2", "bert"])
    parser.add_argument("--probes", nargs="+", default=list(PROBES), choices=PROBES)
    parser.add_argument("--quick", action="store_true", help="one run per probe, 2 NAD networks")
    parser.add_argument("--width", type=int, default=8, help="ResNet-18 first-stage channels")
    parser.add_argument("--gpt2-outputs", type=int, default=10, choices=(10, 100))
    parser.add_argument("--probe-size", type=int, help="override the models' probe sets")
    parser.add_argument("--nad-networks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    runs = 1 if args.quick else 2
    nad_nets = 2 if args.quick else args.nad_networks
    print(f"torch {torch.__version__}, {args.threads} threads; times in s, last of {runs} runs")
    for model_name in args.models:
        factory, loader = build(model_name, args)
        size = args.probe_size or (256 if model_name == "resnet" else 64)
        pl.seed_everything(0, verbose=False)
        step = train_step_seconds(factory(), loader, 3 if args.quick else 5)
        print(f"\n{model_name}: probe set {size}, training step {step:.3f} s "
              f"(batch {loader.batch_size})")  # fmt: skip
        print(f"{'probe':<13}{'s/run':>9}{'steps':>9}{'minimum s':>11}{'ratio':>8}  note")
        for probe_name in args.probes:
            pl.seed_everything(0, verbose=False)
            module = factory()
            try:
                if probe_name == "nad":
                    seconds, floor, note = nad(module, model_name, nad_nets)
                else:
                    cb = make_probe(probe_name, model_name, size, args.gpt2_outputs)
                    seconds = timed_runs(module, loader, cb, runs)[-1]
                    floor, note = minimum(probe_name, cb, module, size)
            except Exception as err:  # a refusal or n/a: print it and go on
                print(f"{probe_name:<13}{'-':>9}  {type(err).__name__}: {str(err)[:600]}")
                continue
            ratio = seconds / floor if floor else float("nan")
            flag = "" if ratio <= 2.0 else "  > 2x"
            print(f"{probe_name:<13}{seconds:>9.3f}{seconds / step:>9.1f}{floor:>11.3f}"
                  f"{ratio:>8.2f}  {note}{flag}")  # fmt: skip
    print("\ntarget: every ratio <= 2 (printed, not asserted)")


if __name__ == "__main__":
    main()
