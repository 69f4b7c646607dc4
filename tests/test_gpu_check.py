"""benchmarks/gpu_check.py runs on the CPU (CUDA checks recorded as skipped) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_run_writes_results_and_timings(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["cuda"] == torch.cuda.is_available() and report["total_seconds"] > 0
    cpu_checks = ("env", "backends", "probes_32-true")
    for name in cpu_checks:
        assert checks[name]["status"] == "ok", checks[name]
        assert checks[name]["seconds"] >= 0
    runs = checks["probes_32-true"]["details"]["runs"]
    assert len(runs) == 6 and all(r >= 1 for r in runs.values())
    cuda_checks = set(checks) - set(cpu_checks)
    assert {"probes_bf16-true", "oom", "memory_kept", "values_vs_cpu", "compile"} <= cuda_checks
    if not torch.cuda.is_available():
        assert all(checks[c]["status"] == "skipped" for c in cuda_checks)
