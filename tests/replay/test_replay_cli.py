"""``python -m lightning_probes replay`` end to end, on the example model of
examples/replay_checkpoints.py: TensorBoard and CSV files at the checkpoints' steps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_probes.replay.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "replay_checkpoints.py"
sys.path.insert(0, str(EXAMPLE.parent))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from replay_checkpoints import train

    return train(tmp_path_factory.mktemp("example"), steps=6, every=2)


def test_command_writes_tensorboard_scalars_at_checkpoint_steps(checkpoints, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    command = [
        sys.executable, "-m", "lightning_probes", "replay",
        "--model", f"{EXAMPLE}:ReplayMLP",
        "--checkpoints", str(checkpoints),
        "--data", f"{EXAMPLE}:probe_set",
        "--probes", "lca,ablation,landscape",
        "--probe-args", json.dumps({"landscape": {"plane_resolution": 3}}),
        "--save-dir", str(tmp_path / "logs"), "--version", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replayed 3 checkpoint(s) at global steps [2, 4, 6]" in done.stdout
    assert "lca segment 2 -> 4" in done.stdout and "integration error" in done.stdout
    events = EventAccumulator(str(tmp_path / "logs" / "replay" / "version_0"))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["probes/ablation/auc"] == [2, 4, 6]
    assert steps["probes/landscape/loss"] == [2, 4, 6]
    assert steps["probes/lca/lc"] == [4, 6]  # one per checkpoint pair
    assert steps["probes/lca/net.0/cumulative_lc"] == [4, 6]
    assert steps["probes/landscape/segment_barrier_lag1"] == [4, 6]
    figures = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert any(s == [2, 4, 6] for tag, s in figures.items() if "landscape" in tag), figures


def test_yaml_config_and_csv_logger(checkpoints, tmp_path, capsys):
    config = {
        "model": f"{EXAMPLE}:ReplayMLP",
        "checkpoints": [str(checkpoints)],
        "data": f"{EXAMPLE}:probe_set",
        "probes": {"ablation": {"num_orderings": 2}, "selectivity": None},
        "logger": "csv",
        "save_dir": str(tmp_path / "logs"),
        "version": 0,
    }
    path = tmp_path / "replay.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["replay", "--config", str(path)]) == 0
    rows = list(csv.DictReader((tmp_path / "logs" / "replay" / "version_0" / "metrics.csv").open()))
    for probe in ("ablation", "selectivity"):
        logged = [r for r in rows if any(r[k] for k in r if k.startswith(f"probes/{probe}/"))]
        assert [int(r["step"]) for r in logged] == [2, 4, 6], probe
    assert "runs: ablation=3, selectivity=3" in capsys.readouterr().out


def test_bad_input_ends_with_a_message(tmp_path, capsys):
    args = ["replay", "--model", f"{EXAMPLE}:ReplayMLP", "--checkpoints", str(tmp_path),
            "--data", f"{EXAMPLE}:probe_set"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert "found none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args[:-1], "no_such_module:probe_set"])
    assert "Could not import 'no_such_module'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--probes", "lca,nope"])
    assert "Unknown or unselected probe(s) ['nope']" in capsys.readouterr().err
