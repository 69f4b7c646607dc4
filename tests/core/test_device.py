"""One host synchronisation for many tensors; the budget clock waits for a CUDA queue."""

from __future__ import annotations

import torch

from lightning_probes.callbacks.budget import RunBudget, clock
from lightning_probes.core import device as device_module
from lightning_probes.core.device import synchronize, tensors_equal, to_floats


def test_tensors_equal_matches_torch_equal_per_tensor():
    a = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    cases = [
        ({k: v.clone() for k, v in a.items()}, True),
        ({"w": a["w"].clone(), "b": torch.tensor([0.0, 1e-30])}, False),
        ({"w": a["w"].clone()}, False),  # a missing name
        ({"w": a["w"].clone().T, "b": a["b"]}, False),  # another shape
        ({"w": a["w"].clone(), "b": torch.tensor([-0.0, 0.0])}, True),  # as torch.equal
    ]
    for b, expected in cases:
        naive = a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
        )
        assert tensors_equal(a, b) is expected is naive
    nan = {"x": torch.tensor([float("nan")])}
    assert tensors_equal(nan, nan) is torch.equal(nan["x"], nan["x"]) is False
    assert tensors_equal({}, {}) is True


def test_to_floats_keeps_order_and_values():
    values = [torch.tensor(0.1), 2.5, torch.tensor(-3.0, dtype=torch.float64), torch.tensor(7)]
    assert to_floats(values) == [float(v) for v in values]
    assert to_floats([1, 2.0]) == [1.0, 2.0]


def test_synchronize_waits_for_cuda_devices_only(monkeypatch):
    calls = []
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "synchronize", calls.append)
    synchronize(torch.device("cpu"))
    synchronize(None)
    assert calls == []
    synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_budget_clocks_synchronize_before_reading_the_time(monkeypatch):
    """Training work still queued on the GPU when a probe starts is not the probe's: every
    clock the budget reads on a CUDA model first drains the queue."""
    events: list[str] = []
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(device_module.torch.cuda, "synchronize", lambda d: events.append("sync"))
    cuda = torch.device("cuda", 0)
    budget = RunBudget(0.1)
    started = budget.start(cuda)
    budget.charge_since(started, cuda)
    budget.record_run(clock(cuda), cuda)
    assert events == ["sync"] * 4
    budget.record_run(clock(torch.device("cpu")), torch.device("cpu"))
    assert events == ["sync"] * 4
