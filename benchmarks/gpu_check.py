"""One script for the GPU checks of lightning_probes: results and timings in one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json          # on a GPU, under 5 minutes
    python benchmarks/gpu_check.py --quick --out /tmp/check.json  # CPU smoke run, seconds

Checks (each timed, each in its own ``try``: one failing check never stops the others; a global
``--time-limit`` skips what no longer fits and interrupts a check that overruns it):

- ``env``: versions, device, bf16 support.
- ``backends``: inside a probe's scope TF32 is off, cuDNN is off for RNNs and SDPA uses the math
  kernel; the user's flags are back afterwards.
- ``probes_<precision>`` for ``32-true``, ``bf16-mixed``, ``16-mixed``, ``bf16-true``: every
  probe (LCA, ablation, selectivity, CKA, NAD, landscape) fits on CUDA; no probe fails, every
  probe ran, every logged value is finite.
- ``compile``: the same under ``torch.compile``.
- ``rnn`` / ``attention``: an LSTM model (cuDNN refuses eval-mode backward) and an attention
  model with the Hessian (flash attention has no double backward).
- ``oom``: most of the free memory taken before a run: the probe skips with a warning that
  states the memory, and training reaches ``max_steps``.
- ``memory_kept``: ``torch.cuda.memory_allocated`` after each step with each probe, minus a
  run without probes: what each probe keeps on the device between runs.
- ``values_vs_cpu``: the probes' logged values on CUDA against the CPU (float32, TF32 off).

Without CUDA the CUDA checks are recorded as ``skipped`` and the rest run on the CPU. Imports
nothing from ``tests/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_probes as lp
from lightning_probes.core.isolation import isolated

CUDA = torch.cuda.is_available()
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")


class Classifier(pl.LightningModule):
    """Conv -> ReLU -> pool -> MLP head on 1x12x12 images (every probe's layer types)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 4),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]).float(), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class MLP(Classifier):
    """Linear layers only: on the GPU and the CPU the same float32 arithmetic up to rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(144, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
            nn.Linear(32, 4),
        )  # fmt: skip


class LSTMNet(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(12, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x.reshape(x.shape[0], 12, 12))[0][:, -1])


class AttentionNet(Classifier):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(12, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x.reshape(x.shape[0], 12, 12)).mean(1))


class Recorder(Logger):
    """Keeps the last logged value of every key, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.values.update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def loader(n: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)


def probes(
    size: int, which: tuple[str, ...] | None = None, quick: bool = False
) -> list[pl.Callback]:
    """Every probe (or those named in ``which``), on ``size`` samples; ``quick``: cheapest."""
    common = {"every_n_steps": 2, "probe_size": size, "max_overhead": None}
    nets, top_k = (4, None) if quick else (32, 2)
    made = {
        "lca": lambda: lp.LossContributionCallback(**{**common, "every_n_steps": 1}),
        "ablation": lambda: lp.AblationAUCCallback(num_orderings=2, num_points=5, **common),
        "selectivity": lambda: lp.SelectivityCallback(mutual_information=True, **common),
        "cka": lambda: lp.LayerCKACallback(**common),
        "nad": lambda: lp.NADCallback(num_networks=nets, **common),
        "landscape": lambda: lp.LandscapeCallback(
            plane_resolution=3, hessian_top_k=top_k, **common
        ),
    }
    return [make() for name, make in made.items() if which is None or name in which]


def fit(
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    *,
    device: str,
    steps: int = 4,
    precision: str = "32-true",
    extra: list[pl.Callback] | None = None,
) -> dict[str, Any]:
    """Fit; returns the logged probe values, the probes' runs and the failure warnings."""
    pl.seed_everything(0, verbose=False)
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision,
            max_steps=steps, logger=recorder, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[*callbacks, *(extra or [])],
        )  # fmt: skip
        trainer.fit(model, loader())
    values = {k: v for k, v in recorder.values.items() if k.startswith("probes/")}
    signs = ("failed at step", "skipped its run", "out of memory")
    failures = [str(w.message)[:600] for w in caught if any(s in str(w.message) for s in signs)]
    runs = {type(c).__name__: c.runs for c in callbacks if hasattr(c, "runs")}
    return {"values": values, "failures": failures, "runs": runs, "steps": trainer.global_step}


def check_env() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    info["lightning"], info["cuda"] = pl.__version__, CUDA
    if CUDA:
        info["device"] = torch.cuda.get_device_name()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["free_bytes"], info["total_bytes"] = torch.cuda.mem_get_info()
    return info


def check_backends() -> dict[str, Any]:
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with isolated(nn.LSTM(2, 2)):
            inside = {
                "matmul_precision": torch.get_float32_matmul_precision(),
                "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                "cudnn": torch.backends.cudnn.enabled,
                "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
            }
        after = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    finally:
        torch.set_float32_matmul_precision("highest")
    assert inside == {
        "matmul_precision": "highest", "cudnn_tf32": False, "cudnn": False, "flash_sdp": False
    }, inside  # fmt: skip
    assert after == ("high", True), after
    return {"inside": inside, "restored": True}


def check_probes(precision: str, quick: bool, compile_model: bool = False) -> Callable[[], Any]:
    def run() -> dict[str, Any]:
        # the model's initial weights seeded too: with 8 probe samples an unseeded MLP had
        # no correct sample about one run in ten, and its normalised AUC was then infinite
        pl.seed_everything(0, verbose=False)
        model: nn.Module = MLP() if quick else Classifier()
        if compile_model:
            model = torch.compile(model)
        device = "cuda" if CUDA else "cpu"
        callbacks = probes(8 if quick else 64, quick=quick)
        steps = 2 if quick else 4
        out = fit(model, callbacks, device=device, precision=precision, steps=steps)  # type: ignore[arg-type]
        bad = [k for k, v in out["values"].items() if not math.isfinite(v)]
        assert not out["failures"], out["failures"]
        assert all(r >= 1 for r in out["runs"].values()), out["runs"]
        assert not bad, f"non-finite values: {bad}"
        return {"runs": out["runs"], "num_values": len(out["values"])}

    return run


def check_model(model_cls: type[pl.LightningModule], which: tuple[str, ...]) -> Callable[[], Any]:
    def run() -> dict[str, Any]:
        pl.seed_everything(0, verbose=False)
        out = fit(model_cls(), probes(32, which), device="cuda")
        assert not out["failures"], out["failures"]
        assert all(r >= 1 for r in out["runs"].values()), out["runs"]
        return {"runs": out["runs"]}

    return run


class _Hog(pl.Callback):
    """Takes all but 2 MiB of the GPU memory just before the probe's run at step 2 (it comes
    before the probe among the callbacks); :class:`_Release` (after it) gives it back, so
    training itself never runs short."""

    def __init__(self) -> None:
        self.held: list[torch.Tensor] = []
        self.held_bytes = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 2 and not self.held:
            torch.cuda.empty_cache()  # the allocator's cached blocks count as taken too
            free, _ = torch.cuda.mem_get_info()
            self.held_bytes = max(0, free - 2 * 2**20)
            self.held.append(torch.empty(self.held_bytes, dtype=torch.uint8, device="cuda"))


class _Release(pl.Callback):
    def __init__(self, hog: _Hog) -> None:
        self.hog = hog

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.hog.held.clear()


def check_oom() -> dict[str, Any]:
    hog = _Hog()
    probe = lp.LandscapeCallback(every_n_steps=2, probe_size=128, plane_resolution=21,
                                 max_overhead=None)  # fmt: skip
    out = fit(Classifier(), [hog, probe], device="cuda", steps=4, extra=[_Release(hog)])
    torch.cuda.empty_cache()
    assert out["steps"] == 4, "training did not continue"
    assert out["failures"], "no probe failed: the memory was not exhausted"
    message = out["failures"][0]
    assert "memory" in message.lower(), message
    return {"held_bytes": hog.held_bytes, "warning": message, "steps": out["steps"]}


class _Memory(pl.Callback):
    def __init__(self) -> None:
        self.after_step: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.cuda.synchronize()
        self.after_step.append(torch.cuda.memory_allocated())


def check_memory_kept() -> dict[str, Any]:
    base = _Memory()
    fit(Classifier(), [], device="cuda", extra=[base])
    kept: dict[str, int] = {}
    for name in ("lca", "ablation", "selectivity", "cka", "nad", "landscape"):
        mem = _Memory()  # after the probe's own hook (callbacks run in order)
        fit(Classifier(), probes(64, (name,)), device="cuda", extra=[mem])
        kept[name] = max(mem.after_step[1:]) - max(base.after_step[1:])
        torch.cuda.empty_cache()
    return {"kept_bytes": kept, "baseline_bytes": max(base.after_step)}


def check_values_vs_cpu() -> dict[str, Any]:
    names = ("lca", "ablation", "selectivity", "cka", "landscape")
    torch.backends.cudnn.deterministic = True
    cpu = fit(MLP(), probes(64, names), device="cpu")["values"]
    gpu = fit(MLP(), probes(64, names), device="cuda")["values"]
    assert cpu.keys() == gpu.keys(), sorted(set(cpu) ^ set(gpu))
    # |gpu - cpu| in units of the tolerance 1e-5 + 1e-3 |cpu| (float32 training, 4 steps)
    err = {k: abs(gpu[k] - cpu[k]) / (1e-5 + 1e-3 * abs(cpu[k])) for k in cpu}
    worst = sorted(err.items(), key=lambda kv: -kv[1])[:8]
    # accuracies (ablation, selectivity's importance) may flip a sample at an argmax tie
    strict = {k: e for k, e in err.items() if not k.startswith(("probes/ablation", "probes/sel"))}
    assert max(strict.values(), default=0.0) <= 1.0, worst
    return {"num_values": len(err), "worst_in_tolerance_units": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--quick", action="store_true", help="tiny CPU-sized smoke run")
    parser.add_argument("--time-limit", type=float, default=270.0, help="seconds for all checks")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    started = time.perf_counter()
    checks: list[tuple[str, bool, Callable[[], Any]]] = [
        ("env", False, check_env),
        ("backends", False, check_backends),
        ("probes_32-true", False, check_probes("32-true", args.quick)),
    ]
    checks += [(f"probes_{p}", True, check_probes(p, args.quick)) for p in PRECISIONS[1:]]
    checks += [
        ("compile", True, check_probes("32-true", args.quick, compile_model=True)),
        ("rnn", True, check_model(LSTMNet, ("lca", "cka", "nad", "landscape"))),
        ("attention", True, check_model(AttentionNet, ("lca", "cka", "landscape"))),
        ("oom", True, check_oom),
        ("memory_kept", True, check_memory_kept),
        ("values_vs_cpu", True, check_values_vs_cpu),
    ]
    results: dict[str, Any] = {}

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the global time limit of {args.time_limit:.0f} s was reached")

    signal.signal(signal.SIGALRM, on_alarm)
    for name, needs_cuda, check in checks:
        left = args.time_limit - (time.perf_counter() - started)
        if needs_cuda and not CUDA:
            results[name] = {"status": "skipped", "reason": "no CUDA device"}
            continue
        if left <= 1:
            results[name] = {"status": "skipped", "reason": "global time limit reached"}
            continue
        signal.setitimer(signal.ITIMER_REAL, left)
        t0 = time.perf_counter()
        try:
            results[name] = {"status": "ok", "details": check()}
        except AssertionError as err:
            results[name] = {"status": "failed", "error": str(err)[:2000]}
        except BaseException as err:  # recorded; the next check still runs
            results[name] = {
                "status": "error",
                "error": f"{type(err).__name__}: {str(err)[:2000]}",
                "traceback": traceback.format_exc()[-4000:],
            }
            if isinstance(err, KeyboardInterrupt):
                break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
        print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    report = {
        "cuda": CUDA,
        "quick": args.quick,
        "total_seconds": round(time.perf_counter() - started, 3),
        "checks": results,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
