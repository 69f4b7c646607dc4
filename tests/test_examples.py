"""examples/real_model_probes.py runs end to end: every probe it attaches logs values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_real_models_example_logs_every_attached_probe():
    from real_model_probes import main

    results = main(steps=2)
    expected = {
        "gpt2": {"lca", "landscape", "ablation", "cka"},
        "bert": {"lca", "landscape", "ablation", "cka"},
        "transformer (sequence-first)": {"cka", "lca", "landscape"},
        "transformer (batch-first)": {"cka", "lca", "landscape", "ablation"},
        "resnet18": {"lca", "landscape", "ablation", "cka"},
    }
    for name, probes in expected.items():
        assert {k.split("/")[1] for k in results[name]} == probes, name
