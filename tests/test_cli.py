"""Probes configured from YAML with LightningCLI (examples/cli_config.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_example_config_builds_every_probe_and_trains(tmp_path):
    from cli import main

    import lightning_probes

    config = yaml.safe_load((EXAMPLES / "cli_config.yaml").read_text())
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["limit_train_batches"] = 3
    config["trainer"]["limit_val_batches"] = 1
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"]["default_root_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    probes = [
        cb for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_probes")
    ]
    expected = [c["class_path"].split(".")[-1] for c in config["trainer"]["callbacks"]]
    assert [type(cb).__name__ for cb in probes] == expected
    for cb, spec in zip(probes, config["trainer"]["callbacks"]):
        assert isinstance(cb, getattr(lightning_probes, type(cb).__name__))
        for key, value in spec["init_args"].items():
            if key in ("every_n_steps", "every_n_epochs"):
                assert getattr(cb.schedule, key) == value
            else:
                assert getattr(cb, key) == value, (type(cb).__name__, key)
    assert cli.trainer.global_step == 3
    assert any(k.startswith("probes/ablation/") for k in cli.trainer.callback_metrics)
