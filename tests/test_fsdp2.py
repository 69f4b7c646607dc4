"""Probes under FSDP2: ``ModelParallelStrategy`` + ``fully_shard`` on 2 CPU processes (gloo).

One launch of ``scripts/fsdp2_fit.py`` trains the same seeded model under FSDP2 with all six
probes, under FSDP2 without probes, and under DDP with the same probes. Under FSDP2 the
parameters are DTensor shards (the last layer's 3 rows split 2 + 1); the probes run on an
unsharded replica with the weights gathered whole, so every logged value and every probe state
must equal DDP's (the same training: both average the same per-rank gradients), and the
trained weights must equal those of the run without probes, bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_fit.py"
PROBES = ("cka", "lca", "ablation", "selectivity", "nad", "landscape")


def run_fsdp2(tmp_path: Path, spec: str, timeout: int = 400) -> dict[str, list[dict]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), spec],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    runs = ("fsdp2", "fsdp2_no_probes", "ddp")
    return {
        run: [json.loads((tmp_path / f"{run}_rank{r}.json").read_text()) for r in (0, 1)]
        for run in runs
    }


def test_every_probe_under_fsdp2_logs_what_ddp_logs_and_leaves_training_unchanged(tmp_path):
    runs = run_fsdp2(tmp_path, "all_probes")
    fsdp2, ddp = runs["fsdp2"], runs["ddp"]
    assert fsdp2[0]["global_step"] == ddp[0]["global_step"] == 2  # ablation stopped both
    for probe in PROBES:
        keys = sorted(k for k in ddp[0]["metrics"] if k.startswith(f"probes/{probe}/"))
        assert keys, f"{probe} logged nothing under DDP"
        for rank in (0, 1):
            got = fsdp2[rank]["metrics"]
            assert sorted(k for k in got if k.startswith(f"probes/{probe}/")) == keys, probe
            for key in keys:
                want = ddp[rank]["metrics"][key]
                assert math.isclose(got[key], want, rel_tol=1e-6, abs_tol=1e-9), (key, got[key])
    # per-parameter states (LCA's cumulative LC, the landscape's θ_0, the NAD basis) are whole
    assert fsdp2[0]["states"] == fsdp2[1]["states"]
    for name, state in ddp[0]["states"].items():
        _assert_close(fsdp2[0]["states"][name], state, name)
    # the probes never change training: the same weights as FSDP2 without probes, bit for bit
    assert fsdp2[0]["weights"] == runs["fsdp2_no_probes"][0]["weights"]
    _assert_close(fsdp2[0]["weights"], ddp[0]["weights"], "weights")


def _assert_close(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), (where, got, want)
    else:
        assert got == want, (where, got, want)
