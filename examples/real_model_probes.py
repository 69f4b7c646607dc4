"""The probes on models from real packages: a HF causal LM, a HF sequence classifier fed dict
batches, ``nn.TransformerEncoder`` in both layouts, and a ResNet (tiny configs, no download).

    python examples/real_model_probes.py            # a few seconds on 2 CPU cores

Each section prints the probe keys it logged, or the reason a probe refused the model at fit
start (what to pass instead). Needs ``transformers`` (``pip install transformers``).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

import lightning_probes as lp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from real_models import (
    GPT2LM,
    BertClassifier,
    ResNet18,
    SeqEncoder,
    dict_loader,
    image_loader,
    seq_loader,
    token_data,
)

LOGS = Path(tempfile.gettempdir()) / "lightning_probes_real_models"


def fit(model: pl.LightningModule, loader, callbacks, steps: int) -> dict[str, float]:
    """Train a few steps with the probes; return the probe metrics of the last step."""
    trainer = pl.Trainer(
        max_steps=steps, callbacks=callbacks, logger=CSVLogger(LOGS), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, loader)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("probes/")}


def probes(**overrides) -> list[pl.Callback]:
    common = {"every_n_steps": 2, "max_overhead": None, "on_error": "raise"}
    return [
        lp.LossContributionCallback(probe_size=16, **common),
        lp.LandscapeCallback(probe_size=16, plane_resolution=5, **common),
        lp.AblationAUCCallback(probe_size=16, num_orderings=3, **common),
        *overrides.pop("extra", []),
    ]


def causal_lm(steps: int) -> dict[str, float]:
    """GPT-2 (HF ``Conv1D`` layers, tied ``lm_head``): logits ``[n, L, V]``, targets ``[n, L]``.

    LCA and the landscape use the token-level cross-entropy; ablation ablates the features of
    each block's ``mlp.c_fc`` (after its GELU) and counts correct tokens. The kernels take the
    next token at the last position as the label (``o = V`` outputs per sample).
    """
    cka = lp.LayerCKACallback(
        every_n_steps=2, probe_size=16, max_overhead=None, on_error="raise",
        output_fn=lambda logits: logits[:, -1],                       # [n, V]
        batch_to_inputs_targets=lambda b: (b["input_ids"], b["labels"][:, -1]),
    )  # fmt: skip
    return fit(GPT2LM(), dict_loader(token_data(64)), probes(extra=[cka]), steps)


def sequence_classifier(steps: int) -> dict[str, float]:
    """BERT fed ``{"input_ids", "attention_mask", "labels"}``: every key but the target reaches
    ``forward`` as a keyword, so the mask is used by every probe."""
    cka = lp.LayerCKACallback(every_n_steps=2, probe_size=16, max_overhead=None)
    return fit(BertClassifier(), dict_loader(token_data(64, classes=3)), probes(extra=[cka]), steps)


def transformer(batch_first: bool, steps: int) -> dict[str, float]:
    """``nn.TransformerEncoder``; with ``batch_first=False`` (PyTorch's default) the layers see
    ``[T, n, d]``: the kernels find the sample axis; ablation refuses such layers at fit start."""
    cka = lp.LayerCKACallback(every_n_steps=2, probe_size=16, max_overhead=None)
    callbacks = [cka, *probes()[:2]]
    if batch_first:
        callbacks.append(lp.AblationAUCCallback(every_n_steps=2, probe_size=16, max_overhead=None))
    return fit(SeqEncoder(batch_first), seq_loader(64), callbacks, steps)


def resnet(steps: int) -> dict[str, float]:
    """ResNet-18 (BatchNorm, downsample branches): ablation of the last three convs."""
    cka = lp.LayerCKACallback(
        every_n_steps=2, probe_size=16, max_overhead=None, layers=["layer4.1.conv2", "fc"]
    )
    return fit(ResNet18(), image_loader(64), probes(extra=[cka]), steps)


def main(steps: int = 4) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    results = {
        "gpt2": causal_lm(steps),
        "bert": sequence_classifier(steps),
        "transformer (sequence-first)": transformer(False, steps),
        "transformer (batch-first)": transformer(True, steps),
        "resnet18": resnet(steps),
    }
    for name, metrics in results.items():
        probes_seen = sorted({k.split("/")[1] for k in metrics})
        print(f"{name:30s} {len(metrics):4d} values from {', '.join(probes_seen)}")
    return results


if __name__ == "__main__":
    main()
