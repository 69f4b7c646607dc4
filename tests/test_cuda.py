"""The GPU checks (skipped without CUDA): every probe under every precision, compiled, a real
OOM, the memory each probe keeps, and values against the CPU with TF32 off.

The checks themselves live in ``benchmarks/gpu_check.py`` (one script that also times them and
writes a JSON report); each test here runs one of them and fails on what it reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_check() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    return _gpu_check()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_every_probe_runs_on_cuda_under_each_precision(gpu_check, precision):
    details = gpu_check.check_probes(precision, quick=False)()
    assert set(details["runs"]) == {
        "LossContributionCallback", "AblationAUCCallback", "SelectivityCallback",
        "LayerCKACallback", "NADCallback", "LandscapeCallback",
    }  # fmt: skip


def test_every_probe_runs_on_a_compiled_model(gpu_check):
    gpu_check.check_probes("32-true", quick=False, compile_model=True)()


def test_rnn_and_attention_models(gpu_check):
    """cuDNN's RNN backward refuses eval mode; flash attention has no double backward."""
    gpu_check.check_model(gpu_check.LSTMNet, ("lca", "cka", "nad", "landscape"))()
    gpu_check.check_model(gpu_check.AttentionNet, ("lca", "cka", "landscape"))()


def test_a_real_oom_skips_the_run_with_a_warning_and_training_continues(gpu_check):
    details = gpu_check.check_oom()
    assert details["steps"] == 4 and "memory" in details["warning"].lower()


def test_memory_each_probe_keeps_between_runs(gpu_check):
    kept = gpu_check.check_memory_kept()["kept_bytes"]
    # a 7.6k-parameter model and 64 probe samples: probe sets, snapshots, cached gradients
    assert all(v <= 16 * 2**20 for v in kept.values()), kept


def test_values_match_the_cpu_with_tf32_off(gpu_check):
    torch.backends.cudnn.allow_tf32 = True  # the default: the probes turn it off themselves
    gpu_check.check_values_vs_cpu()


def test_backends_inside_probes(gpu_check):
    gpu_check.check_backends()
