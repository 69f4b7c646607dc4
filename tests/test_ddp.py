"""Probes under `Trainer(strategy="ddp", accelerator="cpu", devices=2)` (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"


def run_ddp(
    tmp_path: Path,
    spec: str,
    timeout: int = 300,
    stderr: list | None = None,
    precision: str = "32-true",
) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), spec, precision],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    if stderr is not None:
        stderr.append(result.stderr)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1]


def event_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("events.out.tfevents.*"))


def test_base_probe_same_values_on_both_ranks_and_written_once(tmp_path):
    r0, r1 = run_ddp(tmp_path, "base_probe")
    assert r0["global_step"] == r1["global_step"] == 6
    probe_keys = sorted(k for k in r0["metrics"] if k.startswith("probes/"))
    assert probe_keys == ["probes/gradnorm/loss", "probes/gradnorm/norm"]
    for key in probe_keys:
        assert r0["metrics"][key] == r1["metrics"][key], key
    assert r0["states"] == r1["states"]
    assert len(event_files(tmp_path)) == 1  # one writer: rank zero only


def test_every_probe_under_ddp_agrees_across_ranks_and_stops_together(tmp_path):
    r0, r1 = run_ddp(tmp_path, "all_probes")
    # ablation's early stopping (patience 1, unreachable min_delta) ends training at step 2
    assert r0["should_stop"] and r1["should_stop"]
    assert r0["global_step"] == r1["global_step"] == 2
    for probe in ("cka", "lca", "ablation", "selectivity", "nad", "landscape"):
        keys = sorted(k for k in r0["metrics"] if k.startswith(f"probes/{probe}/"))
        assert keys, f"{probe} logged nothing"
        assert keys == sorted(k for k in r1["metrics"] if k.startswith(f"probes/{probe}/"))
        for key in keys:
            assert r0["metrics"][key] == r1["metrics"][key], key
    assert r0["states"] == r1["states"]
    assert len(event_files(tmp_path)) == 1


def test_every_probe_on_bf16_weights_keeps_the_ranks_in_sync(tmp_path):
    # probes widen bf16 weights to float32 copies; swapping the parameters' own data would
    # reset their gradient accumulators, and DDP's all-reduce hooks with them (ranks diverged)
    r0, r1 = run_ddp(tmp_path, "all_probes", precision="bf16-true")
    assert r0["global_step"] == r1["global_step"] == 2
    assert r0["weights"] == r1["weights"]
    assert {w[-1] for w in r0["weights"].values()} == {"torch.bfloat16"}
    keys = sorted(k for k in r0["metrics"] if k.startswith("probes/"))
    assert len({k.split("/")[1] for k in keys}) == 6
    assert all(r0["metrics"][k] == r1["metrics"][k] for k in keys)
    assert r0["states"] == r1["states"]


def test_a_probe_failing_on_one_rank_neither_deadlocks_nor_hides_its_warning(tmp_path):
    """Rank 1's ablation run fails (OOM) at every step: it used to skip the early-stopping
    collective, leaving rank 0 in all_reduce for ever. Now both ranks vote at every scheduled
    step, rank 0 stops training after its second run, and rank 1 warns under its own name."""
    err: list[str] = []
    r0, r1 = run_ddp(tmp_path, "failing_rank", timeout=180, stderr=err)
    assert r0["should_stop"] and r1["should_stop"]
    assert r0["global_step"] == r1["global_step"] == 2
    assert "[rank 1] FailingOnRank1 failed at step 1" in err[0]
    assert "OutOfMemoryError: simulated: 12.00 GiB needed" in err[0]
    assert "probes/ablation/auc" in r0["metrics"] and "probes/ablation/auc" not in r1["metrics"]
    # out of memory at fit start on rank 1 only: the probe is off on both ranks, announced by each
    assert "[rank 1] StartsOutOfMemoryOnRank1 ran out of memory in its fit-start work" in err[0]
    assert "(an allocation of 3.00 GiB)" in err[0]
    assert "[rank 0] StartsOutOfMemoryOnRank1 is off: another rank ran out of memory" in err[0]
    assert not any(k.startswith("probes/landscape/") for k in (*r0["metrics"], *r1["metrics"]))
