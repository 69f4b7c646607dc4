"""Models and intrinsic minimums for ``bench_real_models.py`` (see its docstring).

Each ``*_minimum`` times, in the calling process, what the probe's method must compute at the
least; :func:`minimum` dispatches on the probe's name and returns ``(seconds, note)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_probes.core.data import ProbeSet, model_arguments
from lightning_probes.core.evaluation import default_loss
from lightning_probes.core.interventions import trace_model
from lightning_probes.core.kernels.tangent import resolve_layers
from lightning_probes.core.nad import network_gradients

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import real_models

VOCAB, TOKENS = 100, 64
NAD_DEFAULT_NETWORKS = 256


class _Module(pl.LightningModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ResNet18(real_models.ResNet18):
    """The tests' ResNet-18 (torchvision ``BasicBlock``s, CIFAR stem, ``width`` channels),
    trained here with momentum like the other benchmark models."""

    configure_optimizers = _Module.configure_optimizers


class GPT2(real_models.GPT2LM):
    """The tests' HF ``GPT2LMHeadModel`` at 4 layers, width 256, 4 heads, 64 tokens, vocabulary
    100, trained here with momentum like the other benchmark models."""

    configure_optimizers = _Module.configure_optimizers

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB, n_positions=TOKENS, n_embd=256, n_layer=4, n_head=4)


def gpt2_model() -> pl.LightningModule:
    return GPT2()


BERT_TOKENS = 32
BERT_UNITS = "model.bert.encoder.layer.*.intermediate.dense"
"""Selectivity's layers on BERT: the feed-forward units, read after their ReLU (the defaults
include the pooler, whose tanh output can be negative, and are refused)."""


class BERT(real_models.BertClassifier):
    """The tests' HF ``BertForSequenceClassification`` at 4 layers, width 128, 4 heads,
    feed-forward 512 with ReLU units, 32 tokens with attention masks, 10 classes; dict batches,
    trained with momentum."""

    configure_optimizers = _Module.configure_optimizers

    def __init__(self) -> None:
        super().__init__(
            vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=512, max_position_embeddings=BERT_TOKENS, num_labels=10,
            hidden_act="relu",
        )  # fmt: skip


def bert_model() -> pl.LightningModule:
    return BERT()


class _Dict(torch.utils.data.Dataset):
    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].roll(-1)}


class _Classes(torch.utils.data.Dataset):
    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def class_token_loader(n: int, batch_size: int) -> DataLoader:
    """Right-padded token ids (lengths 8..32) with attention masks and one class per sequence."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, BERT_TOKENS), generator=g)
    lengths = torch.randint(8, BERT_TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(BERT_TOKENS) < lengths[:, None]).long()
    labels = (ids[:, 0] + ids[:, 1]) % 10
    return DataLoader(_Classes(ids * mask, mask, labels), batch_size=batch_size, shuffle=True)


def token_loader(n: int, batch_size: int) -> DataLoader:
    ids = torch.randint(0, VOCAB, (n, TOKENS), generator=torch.Generator().manual_seed(0))
    return DataLoader(_Dict(ids), batch_size=batch_size, shuffle=True)


def image_loader(n: int, batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def call(model: nn.Module, inputs: Any) -> Any:
    args, kwargs = model_arguments(inputs)
    return model(*args, **kwargs)


def best_time(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_seconds(model: nn.Module, inputs: Any) -> float:
    with torch.no_grad():
        return best_time(lambda: call(model, inputs))


class _Stop(Exception):
    pass


class NullLogger(Logger):
    """A logger that keeps nothing (probes need one to report to; no I/O is timed)."""

    @property
    def name(self) -> str:
        return "null"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def prefix_seconds(model: nn.Module, inputs: Any, module: nn.Module) -> float:
    """Seconds of the forward up to ``module``'s output (a hook stops the pass there)."""

    def stop(*_: Any) -> None:
        raise _Stop

    def run() -> None:
        with contextlib.suppress(_Stop):
            call(model, inputs)

    handle = module.register_forward_hook(stop)
    try:
        with torch.no_grad():
            return best_time(run)
    finally:
        handle.remove()


def matmul_rate() -> float:
    """Float32 multiply-add rate (flop/s) of a 1024 x 1024 matmul here."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 / best_time(lambda: a @ b, 5)


def gram_flops(model: nn.Module, data: ProbeSet, layers: dict[str, nn.Module], o: int) -> float:
    """Flops of the layers' kernel Gram products, the cheaper route per layer (docstring)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    n = len(data)

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                w = module.weight
                k_in, k_out, positions = w[0].numel(), w.shape[0], out[0, 0].numel()
            else:
                k_in, k_out = args[0].shape[-1], out.shape[-1]
                positions = out.numel() // (n * k_out)
            shapes[name] = (k_in, k_out, positions)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            call(model, data.inputs)
    finally:
        for h in handles:
            h.remove()
    total = 0.0
    for name, (k_in, k_out, pos) in shapes.items():
        p = sum(q.numel() for q in layers[name].parameters(recurse=False))
        per_sample = 2.0 * n * o * pos * k_in * k_out + (n * o) ** 2 * p
        # the forward Gram contracted with the output gradients in the cheapest order
        # (factors.py): n²t(t·k + t·o·m + o²·m); with positions the Hadamard form of the
        # backward Gram, (n·t)²k + (n·o·t)²(m + 2), costs more
        factored = float(n) ** 2 * pos * (pos * k_in + pos * o * k_out + o**2 * k_out)
        total += min(per_sample, factored)
    return total


def backward_seconds(model: nn.Module, inputs: Any, output_fn: Any) -> float:
    """Median seconds of one backward pass of the summed outputs (the forward not timed)."""
    times = []
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        out = call(model, inputs)
        total = (output_fn(out) if output_fn else out).sum()
        start = time.perf_counter()
        total.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def gradient_seconds(module: pl.LightningModule, data: ProbeSet) -> float:
    """One gradient evaluation of the loss on ``data`` (train mode: BatchNorm batch stats)."""
    model = copy.deepcopy(module).train()

    def grad() -> None:
        model.zero_grad(set_to_none=True)
        default_loss(call(model, data.inputs), data.targets).backward()

    return best_time(grad)


def minimum(name: str, cb: Any, module: pl.LightningModule, size: int) -> tuple[float, str]:
    """``(seconds, note)``: the intrinsic minimum of probe ``name`` (module docstring)."""
    data: ProbeSet = cb.probe_set
    model = copy.deepcopy(module).eval()
    fwd = forward_seconds(model, data.inputs)
    if name in ("lca", "lca-simpson"):
        grad = gradient_seconds(module, data)
        if name == "lca" and len(cb.history):  # adaptive: what its tolerance rule required
            splits = int(cb.history[-1, 5])
            note = f"{splits + 1} gradient evaluations ({splits} splits by its rule; Simpson: 2)"
            return (splits + 1) * grad, note
        return 2 * grad, "2 gradient evaluations"
    if name == "selectivity":
        return fwd, "1 forward"
    if name == "landscape":
        points = len(cb.planes) * cb.plane_resolution**2
        return points * fwd, f"{points} points x 1 forward ({fwd:.3f} s)"
    if name == "cka":
        layers = resolve_layers(model, None, inputs=data.inputs)
        out = cb.output_fn(call(model, data.inputs)) if cb.output_fn else call(model, data.inputs)
        o = out.shape[-1]

        bwd = backward_seconds(model, data.inputs, cb.output_fn)
        flops = gram_flops(model, data, layers, o)
        gram = flops / matmul_rate()
        note = f"fwd + {o} bwd ({bwd:.3f} s) + {flops / 1e9:.1f} GF Gram ({gram:.2f} s)"
        return fwd + o * bwd + gram, note
    layers = getattr(cb, "layers", None)  # selectivity on BERT: its ReLU units
    trace = trace_model(model, data.inputs, layers, True, cb.output_fn, data.targets)
    points = [trace.points[i] for i in trace.order]
    prefix = {p.name: prefix_seconds(model, data.inputs, p.module) for p in points}
    first = points[0]
    if name == "ablation":
        masks = cb.num_orderings * (cb.num_points - 2) + 2
        suffix = max(fwd - prefix[first.name], 0.0)
        note = f"{masks} masks x suffix {suffix:.3f} s + prefix ({len(points)} points)"
        return prefix[first.name] + masks * suffix, note
    if name == "importance":
        units = sum(p.num_units for p in points)
        suffix = sum(p.num_units * max(fwd - prefix[p.name], 0.0) for p in points)
        return fwd + suffix, f"{units} units x their suffix + 1 forward"
    raise ValueError(name)


def nad(module: pl.LightningModule, model_name: str, networks: int) -> tuple[float, float, str]:
    """``(seconds, minimum, note)`` of the NAD secant basis at 256 networks, scaled."""
    if model_name != "resnet":
        raise ValueError("n/a: NADs need real-valued inputs (the transformers take token ids)")
    shape = (3, 32, 32)
    d = math.prod(shape)
    factory = type(module)
    width = module.conv1.out_channels  # type: ignore[union-attr]
    start = time.perf_counter()
    network_gradients(
        lambda: factory(width), shape, num_networks=networks, generator=torch.Generator()
    )
    seconds = (time.perf_counter() - start) / networks * NAD_DEFAULT_NETWORKS
    model = factory(width).eval()
    batch = torch.randn(512, *shape)
    per_sample = forward_seconds(model, batch) / 512
    minimum = 2 * d * per_sample * NAD_DEFAULT_NETWORKS
    note = f"256 nets (timed {networks}) x 2·{d} fwd ({per_sample * 1e3:.3f} ms each)"
    return seconds, minimum, note
